"""LitGPT jobs: a LoRA run merged into `lit_model.pth`, or into a Hugging Face folder with LitGPT's key map.

Both are planned as ordinary merges into a *view* of the base checkpoint, so the planner, the engine and the
output code need nothing LitGPT-specific: the view renames tensors, splits (or re-interleaves) the fused
qkv into row ranges of the stored tensor, stacks tensors a family keeps as one (Phi-3's gate_up_proj), and
rounds the weights LoRA changes to the merged dtype first, as `litgpt merge_lora` does when it casts the whole
model to the LoRA weights' dtype before merging. The Hugging Face families are in `litgpt_families`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .adapters.lora import Adapter, LoraModule
from .codecs import Source
from .codecs.bnb4 import Bnb4Encoding, RoundTripSource
from .codecs.plain import TensorRef
from .dtypes import dtype_name
from .errors import InputError
from .formats.hf import HFModel, read_json
from .formats.litgpt import CONFIG_FILE, Attention, join_ranges
from .formats.stored_rows import SourceRows, StoredRows, slice_rows
from .litgpt_families import Family, family_of

_LAYER = re.compile(r"^transformer\.h\.(\d+)\.(.+)\.(weight|bias)$")
_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(fc_1|fc_2|proj)$")
_QKV = ("attn.qkv", "attn.attn")  # current and legacy (litgpt <= 0.5.4) names of the fused attention input

# A target: the output tensor's name and the row ranges of the LitGPT tensor it is made of (None: all of it).
Target = tuple[str, list[tuple[int, int]] | None]


def _source(name: str, pieces: list[TensorRef], round_to: torch.dtype | None) -> Source:
    """Pieces joined along rows; rounded to `round_to` on read when LoRA adds to them in that dtype."""
    if len(pieces) == 1 and round_to in (None, pieces[0].dtype):
        return dataclasses.replace(pieces[0], name=name)
    return StoredRows(name, tuple(pieces), round_to or pieces[0].dtype)


def _targets_of(adapter: Adapter) -> set[str]:
    return {f"{lora.module}.weight" for lora in adapter.modules.values()}


def litgpt_view(base: HFModel, adapter: Adapter, dtype: torch.dtype, trained_on: Bnb4Encoding | None) -> HFModel:
    """The base as merged into `lit_model.pth`: same names, LoRA targets rounded to `dtype` first.

    With `trained_on`, every linear weight is read as QLoRA training saw it, `dequantize(quantize(W))`.
    """
    targets = _targets_of(adapter)
    sources: dict[str, Source] = {}
    for name, ref in base.tensors.items():
        round_to = dtype if name in targets else None
        if trained_on is not None and is_linear_weight(name, ref):
            sources[name] = RoundTripSource(ref, trained_on, round_to)
        else:
            sources[name] = _source(name, [ref], round_to)
    return dataclasses.replace(base, sources=sources)


def is_linear_weight(name: str, ref: TensorRef) -> bool:
    """What `litgpt finetune lora --quantize bnb.*` quantizes: every `nn.Linear` (lm_head too), not embeddings."""
    return name.endswith(".weight") and len(ref.shape) == 2 and name != "transformer.wte.weight"


def hf_targets(name: str, family: Family, attention: Attention) -> list[Target]:
    """The Hugging Face tensors a LitGPT tensor becomes, each with the row ranges it takes."""
    module, _, leaf = name.rpartition(".")
    if module in family.top:
        return [(f"{family.top[module]}.{leaf}", None)]
    match = _LAYER.match(name)
    if match:
        index, inner, leaf = match.groups()
        prefix = f"{family.layer_prefix}.{index}"
        if inner in _QKV:
            groups = attention.groups(legacy=inner == "attn.attn")
            if family.fused_qkv is None:
                return [(f"{prefix}.{family.qkv.format(p)}.{leaf}", join_ranges([g[p] for g in groups]))
                        for p in "qkv"]
            order = ([g[p] for g in groups for p in "qkv"] if family.interleaved
                     else [g[p] for p in "qkv" for g in groups])
            return [(f"{prefix}.{family.qkv}.{leaf}", join_ranges(order))]
        expert = _EXPERT.match(inner)
        if expert and family.experts:
            number, projection = expert.groups()
            hf = family.experts.format(e=number, w=family.expert_names[projection])
            return [(f"{prefix}.{hf}.{leaf}", None)]
        if inner in family.layer:
            return [(f"{prefix}.{family.layer[inner]}.{leaf}", None)]
    raise InputError(f"tensor {name!r} has no place in a Hugging Face {family.architecture} (another architecture?)")


@dataclass(frozen=True)
class Placement:
    """Rows of a LitGPT tensor placed in a Hugging Face tensor from row `at` on (`ranges` None: all its rows)."""

    name: str
    ranges: list[tuple[int, int]] | None
    at: int
    whole: bool  # the Hugging Face tensor is exactly the LitGPT tensor


def _placements(base: HFModel, family: Family, attention: Attention,
                dropped: set[str]) -> tuple[dict[str, list[Placement]], dict[str, list[TensorRef]]]:
    """Where each LitGPT tensor's rows go, and each Hugging Face tensor as the stored row ranges it is made of.

    Tensors a family stacks into one (Phi-3's gate_up_proj = [fc_1; fc_2]) are joined in the family's order.
    """
    parts: dict[str, list[tuple[int, str, list[tuple[int, int]] | None]]] = {}
    for name in base.tensors:
        if name in dropped:
            continue
        inner = match.group(2) if (match := _LAYER.match(name)) else name
        for hf_name, ranges in hf_targets(name, family, attention):
            parts.setdefault(hf_name, []).append((family.stack_position(inner), name, ranges))
    placements: dict[str, list[Placement]] = {}
    pieces: dict[str, list[TensorRef]] = {}
    for hf_name, entries in parts.items():
        at = 0
        for _, name, ranges in sorted(entries, key=lambda entry: entry[0]):
            ref = base.tensors[name]
            taken = [ref] if ranges is None else [slice_rows(ref, start, stop) for start, stop in ranges]
            placements.setdefault(name, []).append(Placement(hf_name, ranges, at, len(entries) == 1 and
                                                             ranges is None))
            pieces.setdefault(hf_name, []).extend(taken)
            at += sum(piece.shape[0] for piece in taken)
    return placements, pieces


def _remap(lora: LoraModule, placements: list[Placement], rows: int) -> dict[str, LoraModule]:
    """A LitGPT LoRA term as terms on the Hugging Face tensors its rows land in."""
    found: dict[str, LoraModule] = {}
    for placement in placements:
        module = placement.name.removesuffix(".weight")
        if placement.whole:
            found[module] = dataclasses.replace(lora, module=module)
            continue
        offset, count, position = lora.row_offset or 0, lora.b.shape[0], placement.at
        for start, stop in placement.ranges or [(0, rows)]:
            low, high = max(offset, start), min(offset + count, stop)
            if low < high:
                at = position + low - start
                found[f"{module}[rows {at}:{at + high - low}]"] = dataclasses.replace(
                    lora, module=module, b=slice_rows(lora.b, low - offset, high - offset), row_offset=at)
            position += stop - start
    return found


def hf_view(base: HFModel, adapter: Adapter, dtype: torch.dtype, companions: tuple[Path, ...],
            trained_on: Bnb4Encoding | None = None) -> tuple[HFModel, Adapter]:
    """The base and adapter under Hugging Face names, with a config.json for transformers; with `trained_on`, the
    linear weights as QLoRA training saw them (see `_trained_on_sources`).

    A family whose Hugging Face model ties lm_head to the embedding (Gemma, Phi-4-mini) gets no lm_head, as from
    litgpt's converter, unless the LoRA changes lm_head: then it is written and untied (litgpt's converter would
    drop the merged head and lose that update).
    """
    where = str(base.path / CONFIG_FILE)
    family = family_of(base.config, where)
    attention = Attention.from_config(base.config, base.path / CONFIG_FILE)
    changed_lit = _targets_of(adapter)
    dropped = ({name for name in base.tensors if name.startswith("lm_head.")}
               if family.ties_head and "lm_head.weight" not in changed_lit else set())
    placements, pieces = _placements(base, family, attention, dropped)
    modules: dict[str, LoraModule] = {}
    for lora in adapter.modules.values():
        weight = f"{lora.module}.weight"
        if weight not in placements:
            raise InputError(f"{lora.a.path}: module {lora.module!r} has no weight in the base model {base.path}")
        modules.update(_remap(lora, placements[weight], base.tensors[weight].shape[0]))
    hf_adapter = dataclasses.replace(adapter, modules=modules)
    changed = _targets_of(hf_adapter)
    sources = {name: _source(name, taken, dtype if name in changed else None) for name, taken in pieces.items()}
    if trained_on is not None:
        sources.update(_trained_on_sources(base, placements, trained_on, dtype, changed_lit, sources))
    config = hf_config(base.config, family, attention, tied="lm_head.weight" not in sources, dtype=dtype,
                       original=next((read_json(p) for p in companions if p.name == "config.json"), {}))
    kept = tuple(p for p in companions if p.name not in ("config.json", CONFIG_FILE))
    return dataclasses.replace(base, config=config, sources=sources, companion_files=kept), hf_adapter


def _trained_on_sources(base: HFModel, placements: dict[str, list[Placement]], trained_on: Bnb4Encoding,
                        dtype: torch.dtype, targets: set[str], plain: dict[str, Source]) -> dict[str, Source]:
    """The Hugging Face tensors made of LitGPT linear weights, read as QLoRA training saw those: each LitGPT weight
    round-tripped whole, as `litgpt_view` reads it (double quantization's statistics span the whole fused qkv),
    then split or stacked as its rows are placed."""
    parts: dict[str, list[tuple[int, Source, int, int]]] = {}
    for name, placed in placements.items():
        ref = base.tensors[name]
        if not is_linear_weight(name, ref):
            continue
        source = RoundTripSource(ref, trained_on, dtype if name in targets else None)
        for placement in placed:
            at = placement.at
            for start, stop in placement.ranges or [(0, ref.shape[0])]:
                parts.setdefault(placement.name, []).append((at, source, start, stop))
                at += stop - start
    joined = {hf_name: SourceRows(hf_name, tuple((s, a, b) for _, s, a, b in sorted(entries, key=lambda e: e[0])))
              for hf_name, entries in parts.items()}
    for hf_name, source in joined.items():
        if source.shape != plain[hf_name].shape:
            raise InputError(f"{base.path}: {hf_name} joins linear weights with other tensors; --trained-on cannot "
                             "read it as training saw it: merge to --format litgpt")
    return joined


def hf_config(c: dict[str, Any], family: Family, attention: Attention, *, tied: bool, dtype: torch.dtype,
              original: dict[str, Any]) -> dict[str, Any]:
    """A config.json transformers builds the same model from; token ids kept from the original one, if any."""
    config: dict[str, Any] = {"architectures": [family.architecture], "model_type": family.model_type,
                              "vocab_size": c.get("padded_vocab_size") or c["vocab_size"],
                              **family.config(c, attention), "tie_word_embeddings": tied,
                              "torch_dtype": dtype_name(dtype), "dtype": dtype_name(dtype)}
    tokens = ("bos_token_id", "eos_token_id", "pad_token_id")  # not the class defaults, which may exceed the vocab
    config.update({k: original.get(k) for k in tokens})
    return config

