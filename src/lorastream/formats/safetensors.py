"""safetensors, spec first: a validating header reader and a streaming shard writer.

The `safetensors` package reads and writes whole tensors; a merge needs to read row ranges and to write a
shard whose tensors are produced block by block, so both halves of the format are written here by hand,
following https://github.com/huggingface/safetensors#format.
"""

from __future__ import annotations

import errno
import json
import math
import os
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..codecs.plain import TensorRef
from ..dtypes import SAFETENSORS_DTYPES, SAFETENSORS_NAMES
from ..errors import InputError
from ..io.atomic import output_file
from ..io.locations import Location

# Headers larger than this are refused before allocation (the reference implementation uses 100 MB).
MAX_HEADER_BYTES = 100_000_000
# errno values meaning copy_file_range is unavailable between these files: fall back to read + write.
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF}


@dataclass(frozen=True)
class SafetensorsFile:
    """The parsed header of one safetensors file: its tensors (in data order) and its metadata."""

    path: Path
    tensors: dict[str, TensorRef]
    metadata: dict[str, str]


def read_header(path: Path) -> SafetensorsFile:
    """Parse and validate the header of `path`; no tensor data is read."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise InputError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise InputError(f"{path}: header length {header_len} does not fit in the file ({size} bytes)")
            raw = f.read(header_len)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from exc
    if not raw.startswith(b"{"):
        raise InputError(f"{path}: header is not a JSON object")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InputError(f"{path}: header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise InputError(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InputError(f"{path}: __metadata__ must map strings to strings")
    data_start = 8 + header_len
    entries = sorted((_parse_entry(path, name, info) for name, info in header.items()), key=lambda e: e[1])
    expected_begin = 0
    tensors: dict[str, TensorRef] = {}
    for name, begin, end, dtype, shape in entries:
        if begin != expected_begin:
            raise InputError(f"{path}: tensor {name!r} starts at byte {begin}, expected {expected_begin} "
                             "(tensors must tile the data buffer without holes or overlaps)")
        expected_begin = end
        tensors[name] = TensorRef(name, dtype, shape, path, data_start + begin)
    if data_start + expected_begin != size:
        raise InputError(f"{path}: data buffer holds {size - data_start} bytes, the header describes "
                         f"{expected_begin} (truncated or corrupt file)")
    return SafetensorsFile(path, tensors, dict(metadata))


def _parse_entry(path: Path, name: str, info: object) -> tuple[str, int, int, torch.dtype, tuple[int, ...]]:
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise InputError(f"{path}: tensor {name!r}: expected keys dtype, shape, data_offsets")
    dtype = SAFETENSORS_DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
    if dtype is None:
        raise InputError(f"{path}: tensor {name!r}: unsupported dtype {info['dtype']!r}")
    shape, offsets = info["shape"], info["data_offsets"]
    if not (isinstance(shape, list) and all(type(d) is int and 0 <= d < 2**63 for d in shape)):
        raise InputError(f"{path}: tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)):
        raise InputError(f"{path}: tensor {name!r}: data_offsets {offsets!r} is not [begin, end]")
    begin, end = offsets
    if end - begin != math.prod(shape) * dtype.itemsize:
        raise InputError(f"{path}: tensor {name!r}: {end - begin} bytes stored, shape {shape} in "
                         f"{info['dtype']} needs {math.prod(shape) * dtype.itemsize}")
    return name, begin, end, dtype, tuple(shape)


@dataclass(frozen=True)
class TensorSpec:
    """What the writer needs to lay out a tensor before its bytes exist."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def encode_header(specs: Iterable[TensorSpec], metadata: dict[str, str]) -> bytes:
    """The 8-byte length and JSON header for tensors stored back to back in the given order."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for spec in specs:
        header[spec.name] = {"dtype": SAFETENSORS_NAMES[spec.dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data buffer 8-byte aligned, as the reference writer does
    return struct.pack("<Q", len(raw)) + raw


class ShardWriter:
    """Writes one safetensors file whose tensors arrive as byte chunks, in header order.

    The file is written under a temporary name in the same folder with unbuffered writes (so zero-copy
    kernel copies can be interleaved); `commit` checks that every byte arrived, fsyncs and renames it,
    so a reader never sees a partial shard under its final name.
    """

    def __init__(self, path: Location, specs: list[TensorSpec], metadata: dict[str, str]):
        self.path = path
        header = encode_header(specs, metadata)
        self._expected = len(header) + sum(spec.nbytes for spec in specs)
        self._file = output_file(path, self._expected)
        self.temp_path, self.fd = self._file.temp_path, self._file.fd
        self._written = 0
        self.crc32 = 0  # of everything written so far, for the resume manifest
        self.write(header)

    @property
    def size(self) -> int:
        return self._written

    def write(self, chunk: memoryview | bytes) -> None:
        view = memoryview(chunk).cast("B")
        self.crc32 = zlib.crc32(view, self.crc32)
        while view:
            done = self._file.write(view)
            view = view[done:]
            self._written += done

    def copy_from(self, fd: int, offset: int, count: int) -> bool:
        """Append `count` bytes of `fd` from `offset` inside the kernel; False if this kernel cannot."""
        if self.fd is None:
            return False
        copied = 0
        while copied < count:
            try:
                done = os.copy_file_range(fd, self.fd, count - copied, offset + copied)
            except OSError as exc:
                if copied == 0 and exc.errno in _NO_KERNEL_COPY:
                    return False
                raise
            if done == 0:
                raise InputError(f"input ended while copying {count - copied} more bytes (truncated file?)")
            copied += done
            self._written += done
        self._checksum_range(fd, offset, count)
        return True

    def _checksum_range(self, fd: int, offset: int, count: int) -> None:
        """Bytes copied inside the kernel never pass through here: read them back (from the page cache)."""
        chunk = bytearray(min(count, 1 << 20))
        view = memoryview(chunk)
        for start in range(0, count, len(chunk)):
            got = os.preadv(fd, [view[: min(len(chunk), count - start)]], offset + start)
            self.crc32 = zlib.crc32(view[:got], self.crc32)

    def commit(self) -> None:
        if self._written != self._expected:
            raise AssertionError(f"{self.path}: wrote {self._written} bytes, expected {self._expected}")
        self._file.finish()

    def abort(self) -> None:
        self._file.discard()
