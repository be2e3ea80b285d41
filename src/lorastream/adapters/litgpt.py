"""LitGPT LoRA runs turned into per-module LoRA terms, following litgpt 0.5.13's `lora.py`.

Every LoRA layer (`LoRALinear`) stores `<module>.lora_A` [r, in] and `<module>.lora_B` [out, r] next to its
frozen `<module>.linear.weight`, which a base checkpoint and `merge_lora`'s output call `<module>.weight`.
The fused attention weight (`LoRAQKVLinear`) holds one A and one B for the enabled parts of q, k and v:
part j uses rows [j·r, (j+1)·r) of A and its own contiguous rows of B, and its update lands on the rows of
the fused weight that part occupies. Each part (each query group, in the legacy interleaved layout)
becomes a `LoraModule` with a `row_offset`, whose A and B are views into the same file.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..codecs.plain import TensorRef
from ..errors import InputError
from ..formats.litgpt import HYPERPARAMETERS_FILE, Attention, LoraRun
from ..formats.stored_rows import slice_rows
from .lora import Adapter, LoraModule

QKV_MODULES = (".attn.qkv", ".attn.attn")  # current layout, legacy layout (litgpt <= 0.5.4)


def _pairs(run: LoraRun) -> dict[str, dict[str, TensorRef]]:
    pairs: dict[str, dict[str, TensorRef]] = {}
    for key, ref in run.tensors.items():
        module, _, leaf = key.rpartition(".")
        if leaf not in ("lora_A", "lora_B") or not module:
            raise InputError(f"{ref.path}: tensor {key!r} is not a LoRA A or B matrix; {run.path.name}/"
                             "lit_model.pth.lora should hold only the tensors `litgpt finetune lora` saves")
        if len(ref.shape) != 2:
            raise InputError(f"{ref.path}: tensor {key!r} has shape {list(ref.shape)}, expected a matrix")
        pairs.setdefault(module, {})[leaf] = ref
    for module, found in pairs.items():
        if len(found) != 2:
            raise InputError(f"{run.path}: module {module!r} has only its {next(iter(found))}")
    return pairs


def _qkv_parts(run: LoraRun, module: str, a: TensorRef, b: TensorRef, scale: float, rank: int,
               dtype: torch.dtype | None) -> dict[str, LoraModule]:
    """One LoraModule per enabled part of the fused qkv (per query group in the legacy layout)."""
    hparams = run.path / HYPERPARAMETERS_FILE
    enabled = [part for part, flag in zip("qkv", ("lora_query", "lora_key", "lora_value"), strict=True)
               if run.hyperparameters.get(flag)]
    attention = Attention.from_config(run.config, run.path / "model_config.yaml")
    legacy = module.endswith(".attn.attn")
    layout = {part: attention.part_rows(part, legacy) for part in enabled}
    sizes = [sum(stop - start for start, stop in layout[part]) for part in enabled]
    if a.shape[0] != rank * len(enabled) or b.shape != (sum(sizes), rank):
        raise InputError(f"{a.path}: module {module!r}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not "
                         f"fit rank {rank} on parts {enabled or 'none'} with sizes {sizes} ({hparams}: "
                         "lora_query/lora_key/lora_value, model_config.yaml: n_head/n_query_groups/head_size)")
    modules: dict[str, LoraModule] = {}
    b_row = 0
    for j, part in enumerate(enabled):
        part_a = slice_rows(a, j * rank, (j + 1) * rank)
        for g, (start, stop) in enumerate(layout[part]):
            label = f"{module}[{part}]" if len(layout[part]) == 1 else f"{module}[{part}, group {g}]"
            part_b = slice_rows(b, b_row, b_row + stop - start)
            modules[label] = LoraModule(module, part_a, part_b, scale, row_offset=start, compute_dtype=dtype)
            b_row += stop - start
    return modules


def read_litgpt_adapter(run: LoraRun, dtype: torch.dtype | None) -> Adapter:
    """The LoRA terms of a run, by base module path; B @ A, its scaling and the sum computed in `dtype`.

    LitGPT merges in the model's dtype (the LoRA weights' one, unless asked otherwise); `dtype` None means
    float32.
    """
    rank, alpha = run.hyperparameters["lora_r"], run.hyperparameters["lora_alpha"]
    scale = alpha / rank
    modules: dict[str, LoraModule] = {}
    for module, found in _pairs(run).items():
        a, b = found["lora_A"], found["lora_B"]
        if module.endswith(QKV_MODULES):
            modules.update(_qkv_parts(run, module, a, b, scale, rank, dtype))
            continue
        if a.shape[0] != rank or b.shape[1] != rank:
            raise InputError(f"{a.path}: module {module!r}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do "
                             f"not have the rank {rank} that {HYPERPARAMETERS_FILE} gives (lora_r)")
        modules[module] = LoraModule(module, a, b, scale, compute_dtype=dtype)
    if not modules:
        raise InputError(f"{run.path}: the run holds no LoRA tensors")
    return Adapter(str(run.path), modules, {}, dict(run.hyperparameters))


def lora_dtype(run: LoraRun) -> torch.dtype:
    """The dtype `litgpt merge_lora` gives the merged model: that of the LoRA weights (its first tensor's)."""
    if not run.tensors:
        raise InputError(f"{Path(run.path)}: the run holds no LoRA tensors")
    return next(iter(run.tensors.values())).dtype
