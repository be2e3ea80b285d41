"""Lazy reader of `torch.save` zip checkpoints (`.bin`, `.pth`) that never runs pickled code.

`torch.load(weights_only=True)` is safe but loads every tensor (or maps the file, which counts toward
RSS). Here the pickle is replayed with a restricted unpickler whose only callables are stand-ins that
record where each tensor's bytes lie in the (uncompressed) zip archive; no torch code runs.
"""

from __future__ import annotations

import math
import pickle
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..codecs.plain import TensorRef
from ..dtypes import STORAGE_DTYPES
from ..errors import InputError


class _Sealed:
    """Base of the objects the pickle may hold: a BUILD opcode cannot rewrite them after their checks."""

    __slots__ = ()

    def __setstate__(self, state: object) -> None:
        raise InputError("the pickle tries to set the state of a tensor record; refusing it")


class _StorageType(_Sealed):
    __slots__ = ("dtype",)

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


class _Storage(_Sealed):
    __slots__ = ("dtype", "numel", "offset", "path")

    def __init__(self, dtype: torch.dtype, path: Path, offset: int, numel: int):
        self.dtype, self.path, self.offset, self.numel = dtype, path, offset, numel


class _Tensor(_Sealed):
    """Where a pickled tensor's bytes are; turned into a `TensorRef` once the pickle is fully read."""

    __slots__ = ("dtype", "offset", "path", "shape")

    def __init__(self, dtype: torch.dtype, shape: tuple[int, ...], path: Path, offset: int):
        self.dtype, self.shape, self.path, self.offset = dtype, shape, path, offset


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for dim in reversed(shape):
        strides.append(step)
        step *= dim
    return tuple(reversed(strides))


def _int_tuple(path: Path, what: str, values: Any) -> tuple[int, ...]:
    if not isinstance(values, tuple | list) or not all(type(v) is int and 0 <= v < 2**63 for v in values):
        raise InputError(f"{path}: a tensor's {what} {values!r:.80} is not a list of non-negative integers")
    return tuple(values)


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any, *_: Any) -> _Tensor:
    if not isinstance(storage, _Storage):
        raise InputError(f"the pickle rebuilds a tensor from {type(storage).__name__}, not a storage")
    path = storage.path
    shape, strides = _int_tuple(path, "shape", size), _int_tuple(path, "stride", stride)
    (offset,) = _int_tuple(path, "storage offset", (storage_offset,))
    significant = [(s, d) for s, d in zip(strides, shape, strict=True) if d != 1]
    expected = [(s, d) for s, d in zip(_contiguous_strides(shape), shape, strict=True) if d != 1]
    if significant != expected:
        raise InputError(f"{path}: a tensor of shape {list(shape)} is stored non-contiguously "
                         f"(stride {list(strides)}); re-save it with .contiguous()")
    if offset + math.prod(shape) > storage.numel:
        raise InputError(f"{path}: a tensor of shape {list(shape)} runs past the end of its storage")
    return _Tensor(storage.dtype, shape, path, storage.offset + offset * storage.dtype.itemsize)


def _rebuild_parameter(data: Any, *_: Any) -> _Tensor:
    if not isinstance(data, _Tensor):
        raise InputError(f"the pickle rebuilds a parameter from {type(data).__name__}, not a tensor")
    return data


_ALLOWED: dict[tuple[str, str], Callable[..., Any]] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): OrderedDict,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, archive: zipfile.ZipFile, prefix: str, path: Path):
        super().__init__(file)
        self._archive, self._prefix, self._path = archive, prefix, path

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(STORAGE_DTYPES[name])
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        raise InputError(f"{self._path}: the pickle calls {module}.{name}, which is not tensor rebuilding; "
                         "refusing to run it")

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise InputError(f"{self._path}: unexpected persistent id {pid!r:.80} in the pickle")
        _, storage_type, key, _location, numel = pid
        entry = f"{self._prefix}/data/{key}"
        try:
            info = self._archive.getinfo(entry)
        except KeyError:
            raise InputError(f"{self._path}: storage {entry!r} named by the pickle is missing") from None
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 1:
            raise InputError(f"{self._path}: storage {entry!r} is compressed or encrypted; torch.save never does that")
        if type(numel) is not int or numel < 0 or numel * storage_type.dtype.itemsize > info.file_size:
            raise InputError(f"{self._path}: storage {entry!r} holds {info.file_size} bytes, "
                             f"fewer than its {numel} elements need")
        return _Storage(storage_type.dtype, self._path, _data_offset(self._archive, info, self._path), numel)


def _data_offset(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> int:
    """Absolute file offset of an uncompressed member's bytes, checked against its local file header."""
    fp = archive.fp
    assert fp is not None
    fp.seek(info.header_offset)
    local = fp.read(30)
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
        raise InputError(f"{path}: corrupt zip entry {info.filename!r}")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    if fp.read(name_len) != info.filename.encode():
        raise InputError(f"{path}: zip entry {info.filename!r} does not match its local header")
    offset = info.header_offset + 30 + name_len + extra_len
    if offset + info.file_size > path.stat().st_size:
        raise InputError(f"{path}: zip entry {info.filename!r} runs past the end of the file (truncated?)")
    return offset


def load_structure(path: Path) -> Any:
    """Replay the pickle of a torch zip checkpoint; tensors come back as `TensorRef`s (without names)."""
    try:
        with path.open("rb") as source, zipfile.ZipFile(source) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pickles) != 1:
                raise InputError(f"{path}: not a torch zip checkpoint (expected one <name>/data.pkl)")
            prefix = pickles[0].split("/")[0]
            if f"{prefix}/byteorder" in archive.namelist() and archive.read(f"{prefix}/byteorder") != b"little":
                raise InputError(f"{path}: tensors are stored big-endian; only little-endian checkpoints are supported")
            with archive.open(pickles[0]) as f:
                return _RestrictedUnpickler(f, archive, prefix, path).load()
    except zipfile.BadZipFile as exc:
        raise InputError(f"{path}: not a zip archive ({exc}); legacy torch.save files are not supported") from exc
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            NotImplementedError, RuntimeError, RecursionError, MemoryError) as exc:
        raise InputError(f"{path}: corrupt pickle ({exc})") from exc
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from exc


def read_state_dict(path: Path) -> dict[str, TensorRef]:
    """The flat tensor dict of a checkpoint, unwrapping `{"model": {...}}` as LitGPT saves it."""
    structure = load_structure(path)
    if isinstance(structure, dict) and set(structure) == {"model"} and isinstance(structure["model"], dict):
        structure = structure["model"]
    if not isinstance(structure, dict):
        raise InputError(f"{path}: expected a dict of tensors, found {type(structure).__name__}")
    refs: dict[str, TensorRef] = {}
    for name, value in structure.items():
        if not isinstance(value, _Tensor):
            raise InputError(f"{path}: entry {name!r} is not a tensor")
        refs[str(name)] = TensorRef(str(name), value.dtype, value.shape, value.path, value.offset)
    return refs
