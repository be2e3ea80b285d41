"""Staging for a remote OUT: shards under a sibling prefix, a manifest object, the final keys written last.

Object stores have no rename and no lock. A merge into `s3://b/models/out` uploads its shards to
`s3://b/models/.out.lorastream-partial/` (on S3 each appears whole when its multipart upload completes),
records every finished shard's size, CRC-32 and checksum (ETag) in a manifest object there, and only once
every shard is done copies them to their final keys inside the service: shards first, then the companions,
the index and `config.json` last, so OUT never looks like a complete model before it is one. A rerun keeps
the staged shards whose checksum still matches the manifest and redoes the rest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .formats.hf import SAFETENSORS_INDEX
from .staging import Staging
from .storage import RemotePath

# What makes a folder look like a model to a loader: copied last, in this order.
LAST = (SAFETENSORS_INDEX, "config.json")


@dataclass
class RemoteStaging(Staging):
    """A staging prefix on an fsspec filesystem; `path` is a `RemotePath`."""

    checksums: dict[str, str] = field(default_factory=dict)

    @property
    def prefix(self) -> RemotePath:
        assert isinstance(self.path, RemotePath)
        return self.path

    def record(self, filename: str, size: int, crc32: int) -> None:
        self.checksums[filename] = (self.prefix / filename).checksum()
        super().record(filename, size, crc32)

    def _save(self) -> None:
        """One PUT: an object is replaced whole or not at all."""
        checksums = {name: self.checksums[name] for name in self.shards if name in self.checksums}
        self.manifest_path.write_text(json.dumps({"job": self.job, "shards": self.shards, "checksums": checksums},
                                                 indent=2))

    def _proves(self, name: str, info: dict[str, Any], manifest: dict[str, Any]) -> bool:
        """Size and checksum match what was committed: proof enough without downloading the shard again."""
        expected = (manifest.get("checksums") or {}).get(name)
        shard = self.prefix / name
        try:
            if expected is None or shard.checksum() != expected or shard.stat().st_size != info.get("size"):
                return False
        except FileNotFoundError:
            return False
        self.checksums[name] = expected
        return True

    def discard(self) -> None:
        self.prefix.rmtree()

    def promote(self, out_dir: RemotePath) -> None:  # type: ignore[override]
        """Copy the staged files to their final keys (index and config last), then drop the staging prefix.

        An old output (--overwrite) first stops looking complete, then goes: its index and config are
        deleted before its other files.
        """
        self.manifest_path.unlink()
        for old in sorted(out_dir.iterdir(), key=lambda p: p.name not in LAST):
            old.rmtree()

        def order(name: str) -> int:
            return 2 + LAST.index(name) if name in LAST else int(name not in self.shards)

        for name in sorted((p.name for p in self.prefix.iterdir()), key=order):
            (self.prefix / name).copy_to(out_dir / name)
        self.prefix.rmtree()
