"""bitsandbytes 4-bit (NF4/FP4) weights as Hugging Face serializes them: decoding by row blocks.

The arithmetic follows bitsandbytes' documented flat-block formula (its default and CUDA kernels), in float32
with one cast at the end: `w[i] = (code[nibble[i]] * absmax[i // blocksize]).to(dtype)`, where a nested
(double-quantized) absmax is `nested_code[absmax_u8[b]] * nested_absmax[b // nested_blocksize] + offset`.
bitsandbytes 0.50's own CPU kernel is wrong when the inner dimension is not a multiple of 64; this is not.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from ..errors import InputError
from ..formats.tensor_ref import TensorRef

QUANT_STATE_PREFIX = "weight.quant_state.bitsandbytes__"
# Sidecar tensors stored beside `<module>.weight`, relative to the module.
SIDECARS = ("weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map")
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class Bnb4Source:
    """A 4-bit weight: packed nibbles, per-block absmax (possibly itself quantized) and its quant state."""

    name: str
    packed: TensorRef
    absmax: TensorRef
    quant_map: TensorRef
    nested_absmax: TensorRef | None
    nested_quant_map: TensorRef | None
    quant_type: str
    blocksize: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    nested_blocksize: int
    nested_offset: float

    @property
    def path(self) -> Path:
        return self.packed.path

    @property
    def dense_dtype(self) -> torch.dtype:
        return self.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def row_elements(self) -> int:
        return self.numel // self.rows

    @property
    def stored_bytes(self) -> int:
        refs = (self.packed, self.absmax, self.quant_map, self.nested_absmax, self.nested_quant_map)
        return sum(r.nbytes for r in refs if r is not None)

    @property
    def row_alignment(self) -> int:
        """Rows per quantization block boundary: a block may start only where a 4-bit block starts."""
        return self.blocksize // math.gcd(self.row_elements, self.blocksize)

    # packed nibbles (0.5), their int64 indices (8), the looked-up code values and products (4 + 4),
    # the absmax expanded per element (4), the cast result (up to 4)
    decode_bytes_per_element = 25

    @cached_property
    def _code(self) -> torch.Tensor:
        return self.quant_map.read().float()

    @cached_property
    def _nested(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.nested_absmax is None or self.nested_quant_map is None:
            return None
        return self.nested_quant_map.read().float(), self.nested_absmax.read().float()

    def _absmax(self, first_block: int, count: int) -> torch.Tensor:
        buffer = memoryview(bytearray(count * self.absmax.dtype.itemsize))
        raw = self.absmax.read_elements_into(first_block, count, buffer)
        if self._nested is None:
            return raw.float()
        nested_code, nested_absmax = self._nested
        blocks = torch.arange(first_block, first_block + count) // self.nested_blocksize
        absmax = nested_code[raw.long()] * nested_absmax[blocks]
        absmax += self.nested_offset
        return absmax

    def read_rows(self, start: int, stop: int, buffer: memoryview) -> torch.Tensor:
        cols = self.row_elements
        first, count = start * cols, (stop - start) * cols
        if first % self.blocksize:
            raise AssertionError(f"{self.name}: row block {start} is not aligned to {self.blocksize}-value blocks")
        raw = _read_bytes(self.packed, first // 2, (count + 1) // 2, buffer)
        nibbles = torch.empty(raw.numel() * 2, dtype=torch.int64)
        nibbles[0::2] = raw >> 4
        nibbles[1::2] = raw & 0xF
        values = self._code[nibbles[:count]]
        first_block = first // self.blocksize
        blocks = math.ceil(count / self.blocksize)
        scale = self._absmax(first_block, blocks).repeat_interleave(self.blocksize)[:count]
        return (values * scale).to(self.dtype).view(stop - start, cols)


def _read_bytes(ref: TensorRef, first_byte: int, count: int, buffer: memoryview) -> torch.Tensor:
    """Bytes [first_byte, first_byte + count) of a tensor stored as uint8 or as a float view of the same bytes."""
    view = TensorRef(ref.name, torch.uint8, (ref.nbytes,), ref.path, ref.offset)
    return view.read_elements_into(first_byte, count, buffer)


def read_quant_state(ref: TensorRef) -> dict[str, object]:
    try:
        state = json.loads(bytes(ref.read().tolist()).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{ref.path}: tensor {ref.name!r} is not the JSON quant state bitsandbytes writes") from exc
    if not isinstance(state, dict):
        raise InputError(f"{ref.path}: tensor {ref.name!r}: expected a JSON object")
    return state


def bnb4_source(module: str, tensors: dict[str, TensorRef], state_ref: TensorRef) -> Bnb4Source:
    """Build the source of `<module>.weight` from its serialized tensors and quant state."""
    state = read_quant_state(state_ref)
    where = f"{state_ref.path}: {module}.weight"

    def need(suffix: str) -> TensorRef:
        ref = tensors.get(f"{module}.{suffix}")
        if ref is None:
            raise InputError(f"{where}: missing {module}.{suffix}, which a 4-bit weight needs")
        return ref

    try:
        quant_type, blocksize = str(state["quant_type"]), int(state["blocksize"])  # type: ignore[arg-type]
        shape = tuple(int(d) for d in state["shape"])  # type: ignore[union-attr]
        dtype = _DTYPES[str(state["dtype"]).removeprefix("torch.")]
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{where}: quant state lacks or garbles {exc}") from exc
    if quant_type not in ("nf4", "fp4") or blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
        raise InputError(f"{where}: unsupported quant_type {quant_type!r} / blocksize {blocksize}")
    nested = f"{module}.weight.nested_absmax" in tensors
    packed, absmax = need("weight"), need("weight.absmax")
    numel = math.prod(shape)
    if len(shape) != 2 or packed.nbytes != (numel + 1) // 2 or absmax.numel != math.ceil(numel / blocksize):
        raise InputError(f"{where}: packed bytes {packed.nbytes} / absmax {absmax.numel} do not fit shape "
                         f"{list(shape)} with blocksize {blocksize}")
    if (nested and absmax.dtype != torch.uint8) or (not nested and absmax.dtype != torch.float32):
        raise InputError(f"{where}: absmax dtype {absmax.dtype} does not match nested={nested}")
    nested_blocksize = int(state.get("nested_blocksize", 256))  # type: ignore[arg-type]
    return Bnb4Source(f"{module}.weight", packed, absmax, need("weight.quant_map"),
                      need("weight.nested_absmax") if nested else None,
                      need("weight.nested_quant_map") if nested else None, quant_type, blocksize, shape, dtype,
                      nested_blocksize, float(state.get("nested_offset", 0.0)) if nested else 0.0)  # type: ignore[arg-type]
