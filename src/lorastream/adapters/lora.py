"""What an adapter contributes to one base module, independent of the format it came from."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..codecs.plain import TensorRef


@dataclass(frozen=True)
class ParameterTarget:
    """An `nn.Parameter` a PEFT `ParamWrapper` adapts: its in-memory name and shape, and whether its module
    stores experts as [experts, in, out] (`is_transposed`, as gpt-oss does) rather than [experts, out, in]."""

    name: str
    shape: tuple[int, ...]
    transposed: bool


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: its update is `scale · (B @ A)`, optionally DoRA-normalized.

    `embedding` modules store A as [r, num_embeddings] and B as [dim, r]; their update is transposed.
    `row_offset` set means the update covers only rows [row_offset, row_offset + B.rows) of the base weight
    (one part of a fused weight, such as LitGPT's q, k or v inside `attn.qkv`).
    `compute_dtype` is the dtype `B @ A`, its scaling and the sum are rounded to, as the reference does it:
    None is float32 (PEFT); LitGPT merges in the merged model's dtype.

    A LoRA on an `nn.Parameter` (PEFT's `ParamWrapper`, `target_parameters`) holds the factors of every expert:
    A is [experts·r, in] and B [out, r·experts] with expert e's columns at e, e + experts, ... (PEFT's reshape);
    `expert` picks one, `out_rows` the rows of its update a tensor on disk holds (one of the pieces transformers
    concatenates into a fused `gate_up_proj`). PEFT casts such an update to the weight's dtype before adding it
    (two roundings in a half-precision model), and so does the engine for it.
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
    parameter: ParameterTarget | None = None
    expert: int | None = None
    out_rows: tuple[int, int] | None = None

    @property
    def experts(self) -> int:
        return self.parameter.shape[0] if self.parameter is not None and len(self.parameter.shape) == 3 else 1

    @property
    def weight_name(self) -> str:
        """The in-memory tensor the update is added to."""
        return self.parameter.name if self.parameter is not None else f"{self.module}.weight"

    @property
    def rank(self) -> int:
        return self.a.shape[0] // self.experts

    @property
    def update_shape(self) -> tuple[int, int]:
        """Shape of `B @ A` ([out, in] for Linear; [dim, vocab] for embeddings), of one expert's part."""
        low, high = self.out_rows or (0, self.b.shape[0])
        return high - low, self.a.shape[1]


@dataclass(frozen=True)
class Adapter:
    """An adapter as the planner sees it: LoRA modules and whole-tensor replacements, by base module path."""

    source: str
    modules: dict[str, LoraModule]
    replacements: dict[str, TensorRef]
    config: dict[str, object]
    # `target_parameters` LoRA read without its base model: which parameter each wrapper adapts is unknown
    unresolved: dict[str, dict[str, TensorRef]] = field(default_factory=dict)
    # replacements that are a saved copy of the base layer under a LoRA (`base_layer`), not trained modules
    saved_base: frozenset[str] = frozenset()
    # PEFT TrainableTokens: per embedding module, the new values of some rows and their indices
    token_rows: dict[str, tuple[TensorRef, tuple[int, ...]]] = field(default_factory=dict)
