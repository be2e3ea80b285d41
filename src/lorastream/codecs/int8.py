"""bitsandbytes LLM.int8 weights as Hugging Face serializes them: int8 rows with a per-row scale (SCB).

Decoding follows bitsandbytes' `int8_vectorwise_dequant`: `w = int8 * SCB[row] * (1/127)` in float32
(a multiplication by the float32 reciprocal, as bitsandbytes and PEFT compute it, not a division).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch

from ..device import CPU
from ..errors import InputError
from . import kernels
from .bnb4 import tensor_bytes
from .geometry import SameGeometry
from .plain import TensorRef, buffer_region

INV_127 = 7.874015718698502e-3


@dataclass(frozen=True)
class Int8Source(SameGeometry):
    """An int8 weight [out, in] and its per-row absmax `SCB` [out], row-major."""

    name: str
    weight: TensorRef
    scb: TensorRef
    dense_dtype: torch.dtype
    dtype = torch.float32

    @property
    def _geometry(self) -> TensorRef:
        return self.weight

    @property
    def stored_bytes(self) -> int:
        return self.weight.nbytes + self.scb.nbytes

    row_alignment = 1
    # int8 rows (1), their float32 copy (4), the scaled float32 result (4), the cast (up to 4)
    decode_bytes_per_element = 13
    # the int8 rows, then their float32 values, scaled in place
    buffer_bytes_per_element = 5

    @cached_property
    def _scb(self) -> torch.Tensor:
        return self.scb.read().float()

    def read_rows(self, start: int, stop: int, buffer: memoryview, device: torch.device = CPU) -> torch.Tensor:
        rows = self.weight.read_rows(start, stop, buffer, device)
        values, _ = buffer_region(buffer if device == CPU else None, rows.numel(), rows.numel(), torch.float32)
        if values is None:
            return rows.float() * self._scb[start:stop].to(device).view(-1, 1) * INV_127
        values = values.view(rows.shape).copy_(rows)
        return values.mul_(self._scb[start:stop].view(-1, 1)).mul_(INV_127)


def int8_source(module: str, tensors: dict[str, TensorRef], dense_dtype: torch.dtype) -> Int8Source:
    weight, scb = tensors[f"{module}.weight"], tensors.get(f"{module}.SCB")
    where = f"{weight.path}: {module}.weight"
    if scb is None:
        raise InputError(f"{where}: an int8 weight needs {module}.SCB, which is missing")
    fmt = tensors.get(f"{module}.weight_format")
    if fmt is not None and fmt.read().reshape(-1).tolist() not in ([0], []):
        raise InputError(f"{where}: weight_format {fmt.read().tolist()} is a tiled layout; only row-major (0) is "
                         "supported")
    if len(weight.shape) != 2 or scb.shape != (weight.shape[0],) or weight.dtype != torch.int8:
        raise InputError(f"{where}: expected int8 [out, in] with SCB [out], found {weight.dtype} "
                         f"{list(weight.shape)} and SCB {list(scb.shape)}")
    if math.prod(weight.shape) == 0:
        raise InputError(f"{where}: empty int8 weight")
    return Int8Source(f"{module}.weight", weight, scb, dense_dtype)


@dataclass(frozen=True)
class Int8Encoding:
    """Write a weight as LLM.int8 (what `Int8Params` stores): int8 rows, SCB, row-major weight_format."""

    def row_alignment(self, row_elements: int) -> int:
        return 1

    # the float16 copy (2), the float32 product (4), the int8 result (1)
    encode_bytes_per_element = 7

    def state_bytes(self, numel: int) -> int:
        return 0

    def specs(self, name: str, shape: tuple[int, ...]) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        module = name.removesuffix(".weight")
        return [(name, torch.int8, shape), (f"{module}.SCB", torch.float32, (shape[0],)),
                (f"{module}.weight_format", torch.uint8, ())]

    def encoder(self, shape: tuple[int, ...]) -> Int8Encoder:
        return Int8Encoder()


class Int8Encoder:
    """bitsandbytes' `int8_vectorwise_quant` of the float16 weight, one block of whole rows at a time."""

    def __init__(self) -> None:
        self._scb: list[torch.Tensor] = []

    def encode(self, values: torch.Tensor, out: torch.Tensor) -> int:
        row_stats = kernels.quantize_int8(values, out)
        self._scb.append(row_stats.cpu())  # the statistics are written from the host
        return values.numel()

    def statistics(self) -> list[bytes | bytearray]:
        scb = torch.cat(self._scb)
        self._scb = []
        return [tensor_bytes(scb), b"\x00"]
