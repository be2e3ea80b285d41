"""Inputs and outputs named by fsspec URLs (`s3://`, `gs://`, `hf://`, ...): ranged reads, streamed uploads.

Plain paths and `file://` URLs stay `pathlib.Path`s and keep the local fast path (pread, copy_file_range,
fsync + rename). Anything else becomes a `RemotePath`, which offers the part of pathlib's API the readers
use, reads tensor bytes with ranged requests (never a whole weight file, never a read-ahead cache), and
writes shards as streaming multipart uploads whose part buffer the memory plan counts. Credentials come
only from the filesystem's own configuration (environment, config files, `FSSPEC_<PROTOCOL>_*`); a URL is
shown with any user-info and query string removed.
"""

from __future__ import annotations

import errno
import fnmatch
import functools
import math
import os
import posixpath
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar
from urllib.parse import unquote, urlsplit

from ..errors import InputError, LorastreamError

# One ranged request reads at most this much: the transient copy a remote read makes on top of the
# engine's own buffer (fsspec returns a fresh `bytes`, the HTTP client may hold one more).
READ_CHUNK = 4 << 20
# Multipart upload parts: S3 needs at least 5 MiB per part and allows 10,000 parts per object.
MIN_UPLOAD_BLOCK = 8 << 20
MAX_PARTS = 9_000
# The free space an object store reports: none to run out of.
NO_DISK_LIMIT = 1 << 62
_USERINFO = re.compile(r"(?<=://)[^/@\s]*@")
_QUERY = re.compile(r"(://[^\s?#\"']*)[?#][^\s\"']*")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


_Method = TypeVar("_Method", bound=Callable[..., Any])


def _storage_errors(method: _Method) -> _Method:
    """Report the filesystem package's own errors (no credentials, no endpoint) as the I/O errors they are:
    one line naming the file (exit status 5), never a traceback."""

    @functools.wraps(method)
    def wrapper(self: object, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except (OSError, LorastreamError):
            raise
        except Exception as exc:
            raise OSError(errno.EIO, f"{type(exc).__name__}: {redact(str(exc))}", str(self)) from exc

    return wrapper  # type: ignore[return-value]


# The protocols whose filesystem package the `remote` extra installs (s3fs).
REMOTE_EXTRA_PROTOCOLS = ("s3", "s3a")


def redact(url: str) -> str:
    """`url` (or a message holding URLs) without the parts that may carry credentials: user:password@,
    ?query, #fragment."""
    return _QUERY.sub(r"\1", _USERINFO.sub("", url))


def is_url(value: str | os.PathLike[str]) -> bool:
    return isinstance(value, str) and _SCHEME.match(value) is not None


def _filesystem(url: str) -> tuple[Any, str]:
    try:
        from fsspec.core import url_to_fs
    except ImportError:
        raise InputError(f"{redact(url)}: remote paths need fsspec; pip install 'lorastream[remote]'") from None
    protocol = url.split("://", 1)[0]
    try:
        return url_to_fs(url)
    except ImportError as exc:  # fsspec knows the protocol; its package is missing (the message names it)
        hint = str(exc).strip().splitlines()[0] if str(exc).strip() else "its filesystem package is not installed"
        extra = "; pip install 'lorastream[remote]'" if protocol in REMOTE_EXTRA_PROTOCOLS else ""
        raise InputError(f"{redact(url)}: cannot open {protocol}:// URLs: {hint}{extra}") from None
    except ValueError as exc:
        raise InputError(f"{redact(url)}: {exc}") from None


def location(value: str | os.PathLike[str]) -> Path | RemotePath:
    """A local `Path` for plain paths and `file://` URLs, else a `RemotePath` on the URL's filesystem."""
    if isinstance(value, RemotePath | Path):
        return value
    if not is_url(value):
        return Path(value)
    if value.startswith("file://"):
        return Path(unquote(urlsplit(value).path))
    fs, path = _filesystem(value)
    return RemotePath(fs, path.rstrip("/"))


def is_remote(value: object) -> bool:
    return isinstance(value, RemotePath)


@dataclass(frozen=True)
class RemoteStat:
    st_size: int


class RemotePath:
    """A file or folder on an fsspec filesystem, with the part of `pathlib.Path`'s API lorastream uses."""

    def __init__(self, fs: Any, path: str):
        self.fs, self.path = fs, path

    # naming
    def __str__(self) -> str:
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        return redact(f"{protocol}://{self.path}")

    __repr__ = __str__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and (self.fs, self.path) == (other.fs, other.path)

    def __hash__(self) -> int:
        return hash(self.path)

    def __lt__(self, other: RemotePath) -> bool:
        return self.path < other.path

    def __truediv__(self, name: str) -> RemotePath:
        return RemotePath(self.fs, f"{self.path}/{name}")

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def suffix(self) -> str:
        return posixpath.splitext(self.name)[1]

    @property
    def parent(self) -> RemotePath:
        parent = posixpath.dirname(self.path)
        if not parent:
            raise InputError(f"{self}: name a folder inside the bucket, not the bucket itself")
        return RemotePath(self.fs, parent)

    def absolute(self) -> RemotePath:
        return self

    def resolve(self) -> RemotePath:
        return RemotePath(self.fs, posixpath.normpath(self.path))

    def is_relative_to(self, other: RemotePath) -> bool:
        return self.fs is other.fs and (self.path == other.path or self.path.startswith(other.path + "/"))

    def samefile(self, other: object) -> bool:
        return isinstance(other, RemotePath) and self.resolve() == other.resolve()

    # queries
    @_storage_errors
    def exists(self) -> bool:
        return bool(self.fs.exists(self.path))

    @_storage_errors
    def is_file(self) -> bool:
        return bool(self.fs.isfile(self.path))

    @_storage_errors
    def is_dir(self) -> bool:
        return bool(self.fs.isdir(self.path))

    @_storage_errors
    def stat(self) -> RemoteStat:
        try:
            return RemoteStat(int(self.fs.size(self.path)))
        except FileNotFoundError:
            raise InputError(f"{self}: file not found") from None

    @_storage_errors
    def checksum(self) -> str:
        """Changes whenever the object is rewritten (an ETag on object stores)."""
        self.fs.invalidate_cache(self.path)
        return str(self.fs.checksum(self.path))

    @_storage_errors
    def iterdir(self) -> Iterator[RemotePath]:
        """The folder's entries; none for a missing folder (object stores have no empty folders)."""
        self.fs.invalidate_cache(self.path)
        try:
            entries = self.fs.ls(self.path, detail=False)
        except FileNotFoundError:
            entries = []
        names = (posixpath.basename(str(entry).rstrip("/")) for entry in sorted(entries))
        return iter([self / name for name in names if name])

    def glob(self, pattern: str) -> Iterator[RemotePath]:
        return (p for p in self.iterdir() if fnmatch.fnmatchcase(p.name, pattern))

    # contents
    @_storage_errors
    def open(self, mode: str = "rb", buffering: int = -1) -> IO[bytes]:
        """Reading fetches exactly the ranges asked for (no read-ahead cache)."""
        del buffering  # remote files are unbuffered when read, streamed in parts when written
        if "r" in mode:
            try:
                return self.fs.open(self.path, "rb", cache_type="none")  # type: ignore[no-any-return]
            except FileNotFoundError:
                raise InputError(f"{self}: file not found") from None
        return self.fs.open(self.path, "wb")  # type: ignore[no-any-return]

    @_storage_errors
    def read_bytes(self) -> bytes:
        try:
            return bytes(self.fs.cat_file(self.path))
        except FileNotFoundError:
            raise FileNotFoundError(str(self)) from None

    def read_text(self) -> str:
        return self.read_bytes().decode()

    @_storage_errors
    def write_bytes(self, data: bytes) -> None:
        self.fs.pipe_file(self.path, data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    @_storage_errors
    def read_into(self, offset: int, view: memoryview) -> int:
        """Fill `view` from byte `offset` with ranged requests of at most READ_CHUNK; the count read."""
        done = 0
        while done < len(view):
            count = min(READ_CHUNK, len(view) - done)
            try:
                data = self.fs.cat_file(self.path, start=offset + done, end=offset + done + count)
            except FileNotFoundError:
                raise InputError(f"{self}: file not found") from None
            view[done:done + len(data)] = data
            done += len(data)
            if len(data) < count:
                break
        return done

    @_storage_errors
    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.rm_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    @_storage_errors
    def rmtree(self) -> None:
        """Remove this file, or this folder with everything in it."""
        if self.fs.exists(self.path):
            self.fs.rm(self.path, recursive=True)

    @_storage_errors
    def copy_to(self, target: RemotePath) -> None:
        """A copy made by the storage service itself (no bytes through this process)."""
        self.fs.copy(self.path, target.path)


Location = Path | RemotePath


def fingerprint(path: Location) -> tuple[int, int | str]:
    """What identifies a version of an input file: its size and mtime, or its size and remote checksum."""
    if isinstance(path, RemotePath):
        return path.stat().st_size, path.checksum()
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def disk_free(out_dir: Location) -> int:
    """Free space where `out_dir` is written; an object store has no such limit."""
    if isinstance(out_dir, RemotePath):
        return NO_DISK_LIMIT
    probe = next((p for p in (out_dir, *out_dir.parents) if p.exists()), Path("/"))
    return shutil.disk_usage(probe).free


def copy_file(source: Location, target: Location) -> None:
    """Copy a small file (a tokenizer, a config) between any two locations."""
    if isinstance(source, Path) and isinstance(target, Path):
        shutil.copy2(source, target)
    elif isinstance(source, RemotePath) and isinstance(target, RemotePath) and source.fs is target.fs:
        source.copy_to(target)
    else:
        target.write_bytes(source.read_bytes())


def upload_block_size(shard_bytes: int) -> int:
    """The multipart part size for a shard of this size: small, but within the service's part count."""
    return max(MIN_UPLOAD_BLOCK, math.ceil(shard_bytes / MAX_PARTS / (1 << 20)) << 20)


def io_buffer_bytes(inputs: Iterable[Location], out: Location, largest_shard: int, write_chunk: int) -> int:
    """Memory remote I/O takes beyond the engine's buffers: ranged-read copies (the fetched bytes and the HTTP
    client's, on the read-ahead, compute and writer threads at once) and the multipart upload buffer (a part
    and one more write, its copy being sent, the client's request body; measured at 2.5 times that)."""
    reads = 3 * 2 * READ_CHUNK if any(isinstance(p, RemotePath) for p in inputs) else 0
    writes = 3 * (upload_block_size(largest_shard) + write_chunk) if isinstance(out, RemotePath) else 0
    return reads + writes


class RemoteFile:
    """A shard streamed to `path` as a multipart upload of `upload_block_size` parts.

    On object stores the object appears whole when the upload completes (`finish`) or not at all
    (`discard` aborts the upload); elsewhere the staging manifest is what marks a shard finished.
    """

    fd = None  # no kernel copies into a remote file

    @_storage_errors
    def __init__(self, path: RemotePath, size: int):
        self.path = self.temp_path = path
        self._file = path.fs.open(path.path, "wb", block_size=upload_block_size(size))

    @_storage_errors
    def write(self, view: memoryview | bytes) -> int:
        self._file.write(view)
        return len(view)

    @_storage_errors
    def finish(self) -> None:
        self._file.close()

    @_storage_errors
    def discard(self) -> None:
        """Abort the upload (s3fs: the multipart upload) and remove whatever reached the store."""
        self._file.discard()
        self._file.closed = True  # nothing is flushed when it is collected
        self.path.unlink(missing_ok=True)
