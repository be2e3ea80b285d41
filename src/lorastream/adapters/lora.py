"""What an adapter contributes to one base module, independent of the format it came from."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..codecs.plain import TensorRef


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: its update is `scale · (B @ A)`, optionally DoRA-normalized.

    `embedding` modules store A as [r, num_embeddings] and B as [dim, r]; their update is transposed.
    `row_offset` set means the update covers only rows [row_offset, row_offset + B.rows) of the base weight
    (one part of a fused weight, such as LitGPT's q, k or v inside `attn.qkv`).
    `compute_dtype` is the dtype `B @ A`, its scaling and the sum are rounded to, as the reference does it:
    None is float32 (PEFT); LitGPT merges in the merged model's dtype.
    """

    module: str
    a: TensorRef
    b: TensorRef
    scale: float
    embedding: bool = False
    magnitude: TensorRef | None = None
    bias: TensorRef | None = None
    row_offset: int | None = None
    compute_dtype: torch.dtype | None = None

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @property
    def update_shape(self) -> tuple[int, int]:
        """Shape of `B @ A` ([out, in] for Linear; [dim, vocab] for embeddings)."""
        return self.b.shape[0], self.a.shape[1]


@dataclass(frozen=True)
class Adapter:
    """An adapter as the planner sees it: LoRA modules and whole-tensor replacements, by base module path."""

    source: str
    modules: dict[str, LoraModule]
    replacements: dict[str, TensorRef]
    config: dict[str, object]
