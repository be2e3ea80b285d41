"""The staging folder beside OUT: locked, resumable, and promoted into place only when complete.

A merge writes into `.OUT.lorastream-partial/`. Its manifest names the job (inputs, options, version) and
every shard already committed there with its size and CRC-32, so rerunning the same command after a crash or
`kill -9` keeps those shards and redoes the rest. A lock file makes a second merge into the same OUT refuse
instead of interleaving. OUT itself changes in one rename at the very end.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..errors import InputError
from .locations import Location, RemotePath, fingerprint
from .remote_staging import ObjectStorePrefix

MANIFEST = "lorastream-manifest.json"
_CHUNK = 1 << 20


def job_id(inputs: Sequence[Location], options: dict[str, Any], version: str) -> str:
    """Identity of a merge: every input file's path, size and mtime (remote: checksum), the options that
    shape the output."""
    files = sorted({str(p.resolve()): p for p in inputs}.items())
    described = [(name, *fingerprint(p)) for name, p in files]
    text = json.dumps({"inputs": described, "options": options, "version": version}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def file_crc32(path: Location) -> int:
    crc = 0
    with path.open("rb", buffering=0) as f:
        buffer = bytearray(_CHUNK)
        view = memoryview(buffer)
        while count := f.readinto(buffer):
            crc = zlib.crc32(view[:count], crc)
    return crc


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Store(Protocol):
    """Where a staging folder lives, and how it keeps its promises there: `LocalFolder` (rename, fsync, lock) or
    `ObjectStorePrefix` (no rename: checksums, copies in order)."""

    def prepare(self, path: Location) -> None: ...

    def note(self, path: Location, filename: str) -> None: ...

    def save(self, manifest_path: Location, manifest: dict[str, Any]) -> None: ...

    def proves(self, path: Location, name: str, info: dict[str, Any], manifest: dict[str, Any]) -> bool: ...

    def discard(self, path: Location) -> None: ...

    def promote(self, path: Location, out_dir: Location, shards: set[str], last: Sequence[str]) -> None: ...

    def promote_file(self, path: Location, name: str, target: Location) -> None: ...


class LocalFolder:
    """A staging folder on a local disk: the manifest replaced atomically, shards proven by size and CRC-32,
    the folder renamed into place."""

    def prepare(self, path: Path) -> None:
        path.mkdir(exist_ok=True)

    def note(self, path: Path, filename: str) -> None:
        """Nothing to note: the CRC-32 the engine computed is the proof."""

    def save(self, manifest_path: Path, manifest: dict[str, Any]) -> None:
        temp = manifest_path.parent / f".{manifest_path.name}.partial"
        temp.write_text(json.dumps(manifest, indent=2))
        with temp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(temp, manifest_path)
        _fsync_dir(manifest_path.parent)

    def proves(self, path: Path, name: str, info: dict[str, Any], manifest: dict[str, Any]) -> bool:
        """Whether shard `name` still holds what the manifest says was committed."""
        shard = path / name
        return shard.is_file() and shard.stat().st_size == info.get("size") and file_crc32(shard) == info.get("crc32")

    def discard(self, path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)

    def promote(self, path: Path, out_dir: Path, shards: set[str], last: Sequence[str]) -> None:
        """Replace `out_dir` by the complete staging folder; an old output is removed only afterwards."""
        old = out_dir.parent / f".{out_dir.name}.lorastream-old"
        if old.exists():
            shutil.rmtree(old)
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(path, out_dir)
        _fsync_dir(out_dir.parent)
        shutil.rmtree(old, ignore_errors=True)

    def promote_file(self, path: Path, name: str, target: Path) -> None:
        """Rename the staged file `name` over `target` (a single-file output), then drop the staging folder."""
        os.replace(path / name, target)
        _fsync_dir(target.parent)
        shutil.rmtree(path)


@dataclass
class Staging:
    """A locked staging folder and its manifest of finished shards, kept where `store` says."""

    path: Location
    job: str
    store: Store = field(default_factory=LocalFolder)
    shards: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def manifest_path(self) -> Location:
        return self.path / MANIFEST

    def finished(self) -> set[str]:
        return set(self.shards)

    def record(self, filename: str, size: int, crc32: int) -> None:
        """Note a committed shard (size and CRC-32), atomically; called on the writer thread (or, for Ray, the
        driver as tasks report, in any order: kept sorted, so the record is the same however it was written)."""
        self.store.note(self.path, filename)
        self.shards = dict(sorted({**self.shards, filename: {"size": size, "crc32": crc32}}.items()))
        self._save()

    def _save(self) -> None:
        self.store.save(self.manifest_path, {"job": self.job, "shards": self.shards})

    def resume(self, overwrite: bool) -> None:
        """Keep the shards a previous run of this job finished and can still prove; drop everything else."""
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except (OSError, ValueError):
            manifest = None  # nothing was finished: a crash before the first shard
        if isinstance(manifest, dict) and manifest.get("job") != self.job and not overwrite:
            raise InputError(f"{self.path}: holds the partial output of a different merge (other inputs or "
                             "options); rerun that command to resume it, or pass --overwrite to discard it")
        kept: dict[str, dict[str, int]] = {}
        if isinstance(manifest, dict) and manifest.get("job") == self.job:
            for name, info in (manifest.get("shards") or {}).items():
                if isinstance(info, dict) and self.store.proves(self.path, str(name), info, manifest):
                    kept[str(name)] = info
        for entry in self.path.iterdir():
            if entry.name not in kept and entry.name != MANIFEST:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()  # type: ignore[arg-type]
        self.shards = kept
        self._save()

    def discard(self) -> None:
        self.store.discard(self.path)

    def promote(self, out_dir: Location, last: Sequence[str] = ()) -> None:
        """Put the complete staging folder in place of `out_dir`; `last` names the files a loader takes as
        the sign of a complete model, put in place after the others where that is not one rename."""
        self.manifest_path.unlink()
        self.store.promote(self.path, out_dir, set(self.shards), last)

    def promote_file(self, name: str, target: Location) -> None:
        """Put the staged file `name` in place of `target` (a single-file output: a GGUF, or lit_model.pth
        beside its inputs)."""
        self.store.promote_file(self.path, name, target)


@contextmanager
def staging_for(out_dir: Location, job: str, overwrite: bool) -> Iterator[Staging]:
    """Lock OUT, prepare (or resume) its staging folder, and clean up on failure.

    A failure removes the staging folder; an interruption (Ctrl-C, SIGTERM) keeps it, so the same command
    resumes. The lock is released when the process ends, however it ends. A remote OUT stages under a
    sibling prefix (`ObjectStorePrefix`, see `remote_staging`).
    """
    with _output_lock(out_dir):
        store: Store = ObjectStorePrefix() if isinstance(out_dir, RemotePath) else LocalFolder()
        staging = Staging(out_dir.parent / f".{out_dir.name}.lorastream-partial", job, store)
        store.prepare(staging.path)
        staging.resume(overwrite)
        try:
            yield staging
        except KeyboardInterrupt:
            raise
        except BaseException:
            staging.discard()
            raise


@contextmanager
def _output_lock(out_dir: Location) -> Iterator[None]:
    """A lock file beside a local OUT; object stores offer no lock, so a remote OUT has none."""
    if isinstance(out_dir, RemotePath):
        yield
        return
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    lock_path = out_dir.parent / f".{out_dir.name}.lorastream.lock"
    lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"{out_dir}: another lorastream merge is writing this output now; wait for it "
                             "to finish or choose another -o folder") from None
        yield
    finally:
        lock_path.unlink(missing_ok=True)
        os.close(lock_fd)


def promote(staging: Staging, out_dir: Location, last: Sequence[str] = ()) -> None:
    """Put the complete staging folder in place of `out_dir` (see `Staging.promote`)."""
    staging.promote(out_dir, last)
