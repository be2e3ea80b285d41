"""A file written under a temporary name beside its final one, fsynced and renamed only when complete."""

from __future__ import annotations

import os
from pathlib import Path

from .locations import Location, RemoteFile, RemotePath


class AtomicFile:
    """The part both shard writers share: open `.NAME.partial`, then `finish` (fsync, rename) or `discard`."""

    def __init__(self, path: Path):
        self.path = path
        self.temp_path = path.with_name(f".{path.name}.partial")
        self.fd = os.open(self.temp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

    def write(self, view: memoryview | bytes) -> int:
        return os.write(self.fd, view)

    def finish(self) -> None:
        os.fsync(self.fd)
        if hasattr(os, "posix_fadvise"):  # on disk now: drop its pages, so a large merge does not flood the cache
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(self.fd)
        os.replace(self.temp_path, self.path)

    def discard(self) -> None:
        os.close(self.fd)
        self.temp_path.unlink(missing_ok=True)


def output_file(path: Location, size: int) -> AtomicFile | RemoteFile:
    """Where a shard of `size` bytes is written: a local file renamed into place on `finish`, or a multipart
    upload that appears whole on `finish`."""
    return RemoteFile(path, size) if isinstance(path, RemotePath) else AtomicFile(path)
