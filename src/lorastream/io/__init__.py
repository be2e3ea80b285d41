"""Where bytes live: locations (local paths and fsspec URLs), staging folders (manifest, lock, resume, promotion;
on a local disk or an object store), atomic files. Nothing here knows about models."""
