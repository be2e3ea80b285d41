"""A streaming writer of `torch.save` zip checkpoints (LitGPT's `lit_model.pth`).

`torch.save` needs the whole state dict in memory; a merge produces each tensor block by block. The archive
is laid out from the tensor specs alone, entry for entry as PyTorch's own writer (`PyTorchStreamWriter`,
miniz) lays it out: stored entries with data descriptors, tensor bytes aligned to 64 bytes by an "FB" extra
field, zip64 records, so `torch.load` (also with `mmap=True` and computed storage offsets) reads it as its own.
Each tensor's CRC-32 is computed on a few threads while its bytes are written; the whole file's CRC (for the
resume manifest) is joined from the entries' without another pass.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from ..dtypes import STORAGE_NAMES
from ..errors import InputError
from ..io.atomic import AtomicFile
from .crc32 import Checksummer, crc32_combine
from .safetensors import TensorSpec

ALIGNMENT = 64
# Sizes and offsets from this value on need zip64 fields (a module constant so tests can lower it).
ZIP64_LIMIT = 0xFFFFFFFF
_UTF8 = 0x0800
_DESCRIPTOR = 0x0008


class _StorageRecord:
    """Stands for one tensor's storage in the pickle; becomes a persistent id, as torch.save writes it."""

    def __init__(self, key: str, spec: TensorSpec):
        if spec.dtype not in STORAGE_NAMES:
            raise InputError(f"tensor {spec.name!r}: {spec.dtype} cannot be written to a torch checkpoint here")
        self.persistent_id = ("storage", getattr(torch, STORAGE_NAMES[spec.dtype]), key, "cpu",
                              spec.nbytes // spec.dtype.itemsize)


class _TensorRecord:
    """Pickles as `torch._utils._rebuild_tensor_v2(storage, 0, shape, stride, False, OrderedDict())`."""

    def __init__(self, storage: _StorageRecord, shape: tuple[int, ...]):
        self.storage, self.shape = storage, shape

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        strides, step = [], 1
        for dim in reversed(self.shape):
            strides.append(step)
            step *= dim
        args = (self.storage, 0, self.shape, tuple(reversed(strides)), False, OrderedDict())
        return torch._utils._rebuild_tensor_v2, args


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: object) -> object:
        return obj.persistent_id if isinstance(obj, _StorageRecord) else None


def state_dict_pickle(specs: list[TensorSpec], wrap: str | None = None) -> bytes:
    """The `data.pkl` torch.save writes for a dict of contiguous tensors, storage keys "0", "1", ... in order;
    with `wrap`, for `{wrap: that dict}` (LitGPT's `{"model": ...}`)."""
    state = {spec.name: _TensorRecord(_StorageRecord(str(i), spec), spec.shape) for i, spec in enumerate(specs)}
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=2).dump({wrap: state} if wrap else state)  # torch.save's default protocol
    return buffer.getvalue()


@dataclass
class _Entry:
    name: bytes
    size: int
    offset: int = 0
    crc: int = 0
    remaining: int = 0

    @property
    def zip64(self) -> bool:
        return self.size >= ZIP64_LIMIT or self.offset >= ZIP64_LIMIT

    @property
    def flags(self) -> int:
        return _UTF8 | (_DESCRIPTOR if self.size else 0)


class TorchZipWriter:
    """Writes one torch zip checkpoint whose tensors arrive as byte chunks, in spec order.

    Same interface as `safetensors.ShardWriter`: written under a temporary name, renamed by `commit` once
    every byte arrived. `metadata` has no place in a torch checkpoint and is ignored; `wrap` nests the tensors
    under that key (see `state_dict_pickle`).
    """

    def __init__(self, path: Path, specs: list[TensorSpec], metadata: dict[str, str] | None = None,
                 wrap: str | None = None):
        self.path = path
        self._file = AtomicFile(path)
        self.temp_path, self.fd = self._file.temp_path, self._file.fd
        self._prefix = path.stem
        self._pending = [_Entry(self._name(f"data/{i}"), spec.nbytes) for i, spec in enumerate(specs)]
        self._pending.reverse()
        self._done: list[_Entry] = []
        self._current: _Entry | None = None
        self._written = 0
        self.crc32 = 0  # of the whole file so far (between entries), for the resume manifest
        self._checksummer = Checksummer()
        for name, data in (("data.pkl", state_dict_pickle(specs, wrap)), (".format_version", b"1"),
                           (".storage_alignment", str(ALIGNMENT).encode()), ("byteorder", b"little")):
            self._record(name, data)
        self._next_tensor()

    def _name(self, record: str) -> bytes:
        return f"{self._prefix}/{record}".encode()

    @property
    def size(self) -> int:
        return self._written

    def _raw(self, data: bytes | memoryview) -> None:
        """Append bytes whose CRC is accounted elsewhere (an entry's data: its own CRC, joined at its end)."""
        view = memoryview(data)
        while view:
            done = os.write(self.fd, view)
            view = view[done:]
            self._written += done

    def _structure(self, data: bytes) -> None:
        """Append zip structure (headers, descriptors, the directory), checksummed into the file's CRC."""
        self.crc32 = zlib.crc32(data, self.crc32)
        self._raw(data)

    def _record(self, name: str, data: bytes) -> None:
        """A small entry written whole."""
        entry = _Entry(self._name(name), len(data), crc=zlib.crc32(data))
        self._begin(entry)
        if data:
            self._raw(data)
            self._end()

    def _begin(self, entry: _Entry) -> None:
        """Local header, then padding so the data starts on an ALIGNMENT boundary (torch's `getPadding`)."""
        entry.offset, entry.remaining = self._written, entry.size
        zip64 = b""
        if entry.zip64:
            values = ([entry.size, entry.size] if entry.size >= ZIP64_LIMIT else []) + (
                [entry.offset] if entry.offset >= ZIP64_LIMIT else [])
            zip64 = struct.pack(f"<HH{len(values)}Q", 1, 8 * len(values), *values)
        start = entry.offset + 30 + len(entry.name) + len(zip64) + 4
        padding = -start % ALIGNMENT
        extra = zip64 + b"FB" + struct.pack("<H", padding) + b"Z" * padding
        size_field = 0xFFFFFFFF if entry.size >= ZIP64_LIMIT else 0
        self._structure(struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 0, entry.flags, 0, 0, 0, 0, size_field,
                                    size_field, len(entry.name), len(extra)) + entry.name + extra)
        self._current = entry
        if entry.size == 0:
            self._end()

    def _end(self) -> None:
        entry = self._current
        assert entry is not None
        self.crc32 = crc32_combine(self.crc32, entry.crc, entry.size)
        if entry.size:
            fmt = "<4sIQQ" if entry.zip64 else "<4sIII"
            self._structure(struct.pack(fmt, b"PK\x07\x08", entry.crc, entry.size, entry.size))
        self._done.append(entry)
        self._current = None

    def _next_tensor(self) -> None:
        while self._current is None and self._pending:
            self._begin(self._pending.pop())

    def write(self, chunk: memoryview | bytes) -> None:
        view = memoryview(chunk).cast("B")
        while view:
            entry = self._current
            if entry is None:
                raise AssertionError(f"{self.path}: more bytes than the tensors of the checkpoint hold")
            part = view[: entry.remaining]
            checksum = self._checksummer.start(part)
            self._raw(part)
            entry.crc = checksum(entry.crc)
            entry.remaining -= len(part)
            view = view[len(part):]
            if entry.remaining == 0:
                self._end()
                self._next_tensor()

    def copy_from(self, fd: int, offset: int, count: int) -> bool:
        """Never copies inside the kernel: each entry's CRC needs its bytes, so they pass through `write`."""
        return False

    def commit(self) -> None:
        if self._current is not None or self._pending:
            raise AssertionError(f"{self.path}: committed before every tensor was written")
        self._record("version", b"3\n")
        self._structure(self._central_directory())
        self._file.finish()
        self._checksummer.close()

    def abort(self) -> None:
        self._checksummer.close()
        self._file.discard()

    def _central_directory(self) -> bytes:
        start = self._written
        records = []
        for entry in self._done:
            values = ([entry.size, entry.size] if entry.size >= ZIP64_LIMIT else []) + (
                [entry.offset] if entry.offset >= ZIP64_LIMIT else [])
            extra = struct.pack(f"<HH{len(values)}Q", 1, 8 * len(values), *values) if values else b""
            size = min(entry.size, 0xFFFFFFFF)
            records.append(struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 0, 0, entry.flags, 0, 0, 0, entry.crc,
                                       size, size, len(entry.name), len(extra), 0, 0, 0, 0,
                                       min(entry.offset, 0xFFFFFFFF)) + entry.name + extra)
        directory = b"".join(records)
        end = start + len(directory)
        count = len(self._done)
        zip64_end = struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 0x031E, 45, 0, 0, count, count,
                                len(directory), start)
        locator = struct.pack("<4sIQI", b"PK\x06\x07", 0, end, 1)
        eocd = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, min(count, 0xFFFF), min(count, 0xFFFF),
                           min(len(directory), 0xFFFFFFFF), min(start, 0xFFFFFFFF), 0)
        return directory + zip64_end + locator + eocd
