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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .locations import RemotePath


@dataclass
class ObjectStorePrefix:
    """A staging prefix on an fsspec filesystem: shards proven by their checksums, copied into place in order."""

    checksums: dict[str, str] = field(default_factory=dict)

    def prepare(self, path: RemotePath) -> None:
        """Nothing to create: an object store has no folders."""

    def note(self, path: RemotePath, filename: str) -> None:
        self.checksums[filename] = (path / filename).checksum()

    def save(self, manifest_path: RemotePath, manifest: dict[str, Any]) -> None:
        """One PUT: an object is replaced whole or not at all."""
        checksums = {name: self.checksums[name] for name in manifest["shards"] if name in self.checksums}
        manifest_path.write_text(json.dumps({**manifest, "checksums": checksums}, indent=2))

    def proves(self, path: RemotePath, name: str, info: dict[str, Any], manifest: dict[str, Any]) -> bool:
        """Size and checksum match what was committed: proof enough without downloading the shard again."""
        expected = (manifest.get("checksums") or {}).get(name)
        shard = path / name
        try:
            if expected is None or shard.checksum() != expected or shard.stat().st_size != info.get("size"):
                return False
        except FileNotFoundError:
            return False
        self.checksums[name] = expected
        return True

    def discard(self, path: RemotePath) -> None:
        path.rmtree()

    def promote(self, path: RemotePath, out_dir: RemotePath, shards: set[str], last: Sequence[str]) -> None:
        """Copy the staged files to their final keys (`last` last, in its order), then drop the staging prefix.

        An old output (--overwrite) first stops looking complete, then goes: its `last` files are deleted
        before its other files.
        """
        for old in sorted(out_dir.iterdir(), key=lambda p: p.name not in last):
            old.rmtree()

        def order(name: str) -> int:
            return 2 + list(last).index(name) if name in last else int(name not in shards)

        for name in sorted((p.name for p in path.iterdir()), key=order):
            (path / name).copy_to(out_dir / name)
        path.rmtree()

    def promote_file(self, path: RemotePath, name: str, target: RemotePath) -> None:
        """Copy the staged file `name` to `target` (one copy in the service: the object is replaced whole), then
        drop the staging prefix."""
        (path / name).copy_to(target)
        path.rmtree()
