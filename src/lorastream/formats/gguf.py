"""Reading a GGUF file's header: its metadata and where each tensor's bytes are, without loading them.

gguf-py's `GGUFReader` maps and decodes every value, seconds for a 150k-token vocabulary; `inspect` and
`verify` need the scalar keys, the array lengths and the tensor infos, which this walk reads in one pass
(the layout is GGUF v3: header, key-value pairs, tensor infos, aligned data).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

import torch

from ..codecs.plain import TensorRef
from ..dtypes import GGUF_TORCH_DTYPES
from ..errors import InputError
from ..io.locations import Location

MAGIC = b"GGUF"
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
DEFAULT_ALIGNMENT = 32


@dataclass(frozen=True)
class GGUFArray:
    """An array value, by its length (token lists and merges are not decoded)."""

    item_type: int
    length: int


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    ggml_shape: tuple[int, ...]  # ne0 first, as ggml orders dimensions
    type_id: int
    offset: int  # from the start of the data section

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape in torch's order (rows first)."""
        return tuple(reversed(self.ggml_shape))


@dataclass(frozen=True)
class GGUFHeader:
    path: Location
    version: int
    metadata: dict[str, Any]
    tensors: list[GGUFTensorInfo]
    data_start: int


class _Cursor:
    def __init__(self, data: bytes, path: Location):
        self.data, self.at, self.path = data, 0, path

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.at + size > len(self.data):
            raise InputError(f"{self.path}: GGUF header ends early (truncated file?)")
        value = struct.unpack_from(fmt, self.data, self.at)[0]
        self.at += size
        return value

    def string(self) -> str:
        length = self.take("<Q")
        text = self.data[self.at:self.at + length]
        self.at += length
        return text.decode("utf-8", errors="replace")

    def value(self, kind: int) -> Any:
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, length = self.take("<I"), self.take("<Q")
            if item in _SCALARS:
                self.at += length * struct.calcsize(_SCALARS[item])
            else:
                for _ in range(length):
                    self.value(item)
            return GGUFArray(item, length)
        if kind not in _SCALARS:
            raise InputError(f"{self.path}: GGUF value of unknown type {kind}")
        return self.take(_SCALARS[kind])


def read_gguf_header(path: Location) -> GGUFHeader:
    """The metadata (arrays by length) and tensor infos of a GGUF file (local or remote); refuses anything else
    in one line."""
    with path.open("rb") as f:
        head = f.read(24)
        if head[:4] != MAGIC:
            raise InputError(f"{path}: not a GGUF file (no GGUF magic)")
        size = 1 << 20  # metadata and tensor infos come first: read growing prefixes until the walk fits
        while True:
            f.seek(0)
            data = f.read(size)
            try:
                return _parse(data, path)
            except InputError:
                if len(data) < size:
                    raise
                size *= 4


def _parse(data: bytes, path: Location) -> GGUFHeader:
    cursor = _Cursor(data, path)
    cursor.at = 4
    version, n_tensors, n_kv = cursor.take("<I"), cursor.take("<Q"), cursor.take("<Q")
    metadata = {}
    for _ in range(n_kv):
        key = cursor.string()
        metadata[key] = cursor.value(cursor.take("<I"))
    tensors = []
    for _ in range(n_tensors):
        name = cursor.string()
        dims = cursor.take("<I")
        shape = tuple(cursor.take("<Q") for _ in range(dims))
        tensors.append(GGUFTensorInfo(name, shape, cursor.take("<I"), cursor.take("<Q")))
    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    return GGUFHeader(path, version, metadata, tensors, cursor.at + (-cursor.at % alignment))


def type_name(type_id: int) -> str:
    """ggml's name of a tensor type (gguf-py's table when installed, else the number)."""
    try:
        import gguf
    except ImportError:
        return str(type_id)
    try:
        return str(gguf.GGMLQuantizationType(type_id).name)
    except ValueError:
        return str(type_id)


def tensor_refs(header: GGUFHeader) -> dict[str, TensorRef]:
    """Each tensor's stored bytes as lorastream writes them: a dense type as its torch dtype and shape, a block
    type as uint8 rows of whole blocks."""
    from ..codecs.gguf_quants import row_bytes

    refs = {}
    for info in header.tensors:
        name = type_name(info.type_id)
        if name in GGUF_TORCH_DTYPES:
            dtype, shape = GGUF_TORCH_DTYPES[name], info.shape
        else:
            rows = math.prod(info.shape[:-1])
            dtype, shape = torch.uint8, (rows, row_bytes(name, info.shape[-1]))
        refs[info.name] = TensorRef(info.name, dtype, shape, header.path, header.data_start + info.offset)
    return refs
