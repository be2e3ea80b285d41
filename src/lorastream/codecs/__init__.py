"""How a tensor is stored: plain dtypes (a `TensorRef` is its own source) and bitsandbytes NF4/FP4 and int8.

A source is anything the engine can read rows of, decoded:

- `name`, `path`, `shape`, `dtype` (of decoded values), `dense_dtype` (of the tensor written dense by default),
  `rows`, `row_elements`, `numel`, `stored_bytes`;
- `row_alignment`: row blocks must start at multiples of it (quantization blocks are flat);
- `decode_bytes_per_element`: memory a decoded block needs per element, temporaries included;
- `buffer_bytes_per_element`: of it, what the read buffer must hold: the stored bytes, and the decoded values
  and temporaries a decode places after them (see `plain.buffer_region`), at most `decode_bytes_per_element`;
- `read_rows(start, stop, buffer, device) -> Tensor[stop - start, row_elements]` in `dtype`: the stored bytes
  are read into `buffer` on the host and decoded on `device` (a GPU when the merge runs there); the result may
  view `buffer` (a 4-bit block decodes into it, after its packed bytes), so it lives until `buffer` is reused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from ..device import CPU
from ..errors import InputError
from .bnb4 import QUANT_STATE_PREFIX, SIDECARS, Bnb4Encoding, bnb4_source
from .int8 import Int8Encoding, int8_source
from .plain import TensorRef

Encoding = Bnb4Encoding | Int8Encoding


class Source(Protocol):
    name: str

    @property
    def path(self) -> Path: ...

    @property
    def dense_dtype(self) -> torch.dtype: ...

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def rows(self) -> int: ...

    @property
    def row_elements(self) -> int: ...

    @property
    def numel(self) -> int: ...

    @property
    def stored_bytes(self) -> int: ...

    @property
    def row_alignment(self) -> int: ...

    @property
    def decode_bytes_per_element(self) -> int: ...

    @property
    def buffer_bytes_per_element(self) -> int: ...

    def read_rows(self, start: int, stop: int, buffer: memoryview, device: torch.device = CPU) -> torch.Tensor: ...


def group_sources(tensors: dict[str, TensorRef], int8_dtype: torch.dtype) -> dict[str, Source]:
    """The logical tensors of a checkpoint: quantized weights with their sidecars become one source each.

    `int8_dtype` is the dtype an int8 weight is written in when dense (the model's dtype).
    """
    sources: dict[str, Source] = dict(tensors)
    for name, ref in tensors.items():
        for quant_type in ("nf4", "fp4"):
            suffix = f".{QUANT_STATE_PREFIX}{quant_type}"
            if name.endswith(suffix):
                module = name[: -len(suffix)]
                sources[f"{module}.weight"] = bnb4_source(module, tensors, ref)
                for sidecar in (*SIDECARS, name.removeprefix(f"{module}.")):
                    sources.pop(f"{module}.{sidecar}", None)
        if name.endswith(".SCB") and f"{name[:-4]}.weight" in tensors:
            module = name[:-4]
            sources[f"{module}.weight"] = int8_source(module, tensors, int8_dtype)
            sources.pop(name)
            sources.pop(f"{module}.weight_format", None)
    return sources


def encoding_for(name: str | None, double_quant: bool | None, compute_dtype: torch.dtype,
                 option: str = "--quantize") -> Encoding | None:
    """The encoding `--quantize` (or `--trained-on`, 4-bit only) names; double quantization is on for nf4
    unless `double_quant` says otherwise; `compute_dtype` is the one a 4-bit layer computes in."""
    if name is None:
        return None
    if name == "int8" and option == "--quantize":
        return Int8Encoding()
    if name not in ("nf4", "fp4"):
        raise InputError(f"{option} {name!r}: expected nf4 or fp4" + (" or int8" if option == "--quantize" else ""))
    return Bnb4Encoding(name, name == "nf4" if double_quant is None else double_quant, compute_dtype)
