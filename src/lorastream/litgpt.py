"""LitGPT jobs: a LoRA run merged into `lit_model.pth`, or into a Hugging Face folder with LitGPT's key map.

Both are planned as ordinary merges into a *view* of the base checkpoint, so the planner, the engine and the
output code need nothing LitGPT-specific: the view renames tensors, splits (or re-interleaves) the fused
qkv into row ranges of the stored tensor, and rounds the weights LoRA changes to the merged dtype first, as
`litgpt merge_lora` does when it casts the whole model to the LoRA weights' dtype before merging.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
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
from .formats.stored_rows import StoredRows, slice_rows

_LAYER = re.compile(r"^transformer\.h\.(\d+)\.(.+)\.(weight|bias)$")
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


@dataclass(frozen=True)
class Family:
    """How one Hugging Face architecture names LitGPT's modules (as litgpt's `convert_lit_checkpoint` does)."""

    model_type: str
    architecture: str
    top: dict[str, str]
    layer_prefix: str
    layer: dict[str, str]
    fused_qkv: str | None  # GPT-NeoX keeps q, k, v fused, interleaved per head; Llama-style models split them
    config: Callable[[dict[str, Any], Attention], dict[str, Any]]


def _llama_config(c: dict[str, Any], attention: Attention) -> dict[str, Any]:
    config = {"hidden_size": c["n_embd"], "intermediate_size": c["intermediate_size"],
              "num_hidden_layers": c["n_layer"], "num_attention_heads": attention.n_head,
              "num_key_value_heads": attention.n_query_groups, "head_dim": attention.head_size,
              "max_position_embeddings": c["block_size"], "rms_norm_eps": c.get("norm_eps", 1e-5),
              "rope_theta": c.get("rope_base", 10000), "hidden_act": "silu",
              "attention_bias": bool(c.get("bias") or c.get("attn_bias")), "mlp_bias": bool(c.get("bias"))}
    adjustments = c.get("rope_adjustments")
    if adjustments:  # Llama 3.1 and later
        config["rope_scaling"] = {"rope_type": "llama3", "factor": adjustments["factor"],
                                  "low_freq_factor": adjustments["low_freq_factor"],
                                  "high_freq_factor": adjustments["high_freq_factor"],
                                  "original_max_position_embeddings": adjustments["original_max_seq_len"]}
    return config


def _mistral_config(c: dict[str, Any], attention: Attention) -> dict[str, Any]:
    return {**_llama_config(c, attention), "sliding_window": c.get("sliding_window_size")}


def _qwen2_config(c: dict[str, Any], attention: Attention) -> dict[str, Any]:
    if attention.head_size * attention.n_head != c["n_embd"]:
        raise InputError("Qwen2 in transformers derives head_dim from hidden_size; this model's head_size differs")
    return {**_llama_config(c, attention), "use_sliding_window": False}


def _neox_config(c: dict[str, Any], attention: Attention) -> dict[str, Any]:
    return {"hidden_size": c["n_embd"], "intermediate_size": c["intermediate_size"],
            "num_hidden_layers": c["n_layer"], "num_attention_heads": attention.n_head,
            "max_position_embeddings": c["block_size"], "layer_norm_eps": c.get("norm_eps", 1e-5),
            "rotary_pct": c.get("rotary_percentage", 0.25), "rotary_emb_base": c.get("rope_base", 10000),
            "use_parallel_residual": bool(c.get("parallel_residual", True)),
            "hidden_act": "gelu" if c.get("gelu_approximate", "none") == "none" else "gelu_pytorch_tanh",
            "attention_bias": bool(c.get("bias", True))}


_LLAMA_LAYER = {"norm_1": "input_layernorm", "attn.proj": "self_attn.o_proj", "norm_2": "post_attention_layernorm",
                "mlp.fc_1": "mlp.gate_proj", "mlp.fc_2": "mlp.up_proj", "mlp.proj": "mlp.down_proj"}
_LLAMA_TOP = {"transformer.wte": "model.embed_tokens", "transformer.ln_f": "model.norm", "lm_head": "lm_head"}


def _llama_like(model_type: str, architecture: str, config: Callable[..., dict[str, Any]]) -> Family:
    return Family(model_type, architecture, _LLAMA_TOP, "model.layers", _LLAMA_LAYER, None, config)


FAMILIES = {
    "llama": _llama_like("llama", "LlamaForCausalLM", _llama_config),
    "mistral": _llama_like("mistral", "MistralForCausalLM", _mistral_config),
    "qwen2": _llama_like("qwen2", "Qwen2ForCausalLM", _qwen2_config),
    "gpt_neox": Family("gpt_neox", "GPTNeoXForCausalLM",
                       {"transformer.wte": "gpt_neox.embed_in", "transformer.ln_f": "gpt_neox.final_layer_norm",
                        "lm_head": "embed_out"}, "gpt_neox.layers",
                       {"norm_1": "input_layernorm", "attn.proj": "attention.dense",
                        "norm_2": "post_attention_layernorm", "mlp.fc": "mlp.dense_h_to_4h",
                        "mlp.proj": "mlp.dense_4h_to_h"}, "attention.query_key_value", _neox_config),
}
# Settings under which a LitGPT model is not the plain architecture the family's transformers class computes.
_LLAMA_REQUIRES = {"norm_class_name": "RMSNorm", "mlp_class_name": "LLaMAMLP", "parallel_residual": False,
                   "rotary_percentage": 1.0, "rope_interleave": False, "norm_qk": False, "post_attention_norm": False,
                   "post_mlp_norm": False, "scale_embeddings": False, "shared_attention_norm": False,
                   "attention_logit_softcapping": None, "final_logit_softcapping": None, "n_expert": 0,
                   "rope_condense_ratio": 1, "lm_head_bias": False}
_NEOX_REQUIRES = {"norm_class_name": "LayerNorm", "mlp_class_name": "GptNeoxMLP", "rope_interleave": False,
                  "norm_qk": False, "post_attention_norm": False, "post_mlp_norm": False,
                  "scale_embeddings": False, "shared_attention_norm": False, "rope_condense_ratio": 1,
                  "lm_head_bias": False}


def family_of(config: dict[str, Any], where: str) -> Family:
    """The Hugging Face architecture a LitGPT config converts to; refused when none computes the same model."""
    name = str(config.get("name", "")).lower()
    if config.get("mlp_class_name") == "GptNeoxMLP" and not name.startswith(("falcon", "phi")):
        family, requires = FAMILIES["gpt_neox"], _NEOX_REQUIRES
    elif name.startswith(("qwen2", "qwq")):
        family, requires = FAMILIES["qwen2"], {**_LLAMA_REQUIRES, "bias": False, "attn_bias": True}
    elif name.startswith("mistral"):
        family, requires = FAMILIES["mistral"], _LLAMA_REQUIRES
    elif not name.startswith(("gemma", "olmo", "qwen3", "phi", "falcon", "mixtral")):
        family, requires = FAMILIES["llama"], _LLAMA_REQUIRES
    else:
        raise InputError(f"{where}: exporting {config.get('name')!r} to Hugging Face form is not supported yet "
                         "(Llama, Mistral, Qwen2 and GPT-NeoX families are); merge to lit_model.pth and convert "
                         "it with `litgpt convert_from_litgpt`")
    for key, expected in requires.items():
        if key in config and config[key] != expected:
            raise InputError(f"{where}: {key} is {config[key]!r}; {family.architecture} needs {expected!r}, so "
                             "transformers would compute another model. Merge to lit_model.pth instead")
    return family


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
            if family.fused_qkv:
                return [(f"{prefix}.{family.fused_qkv}.{leaf}", join_ranges([g[p] for g in groups for p in "qkv"]))]
            return [(f"{prefix}.self_attn.{p}_proj.{leaf}", join_ranges([g[p] for g in groups])) for p in "qkv"]
        if inner in family.layer:
            return [(f"{prefix}.{family.layer[inner]}.{leaf}", None)]
    raise InputError(f"tensor {name!r} has no place in a Hugging Face {family.architecture} (another architecture?)")


def _remap(lora: LoraModule, targets: list[Target]) -> dict[str, LoraModule]:
    """A LitGPT LoRA term as terms on the Hugging Face tensors its rows land in."""
    found: dict[str, LoraModule] = {}
    for name, ranges in targets:
        module = name.removesuffix(".weight")
        if ranges is None:
            found[module] = dataclasses.replace(lora, module=module)
            continue
        offset, rows, position = lora.row_offset or 0, lora.b.shape[0], 0
        for start, stop in ranges:
            low, high = max(offset, start), min(offset + rows, stop)
            if low < high:
                at = position + low - start
                found[f"{module}[rows {at}:{at + high - low}]"] = dataclasses.replace(
                    lora, module=module, b=slice_rows(lora.b, low - offset, high - offset), row_offset=at)
            position += stop - start
    return found


def hf_view(base: HFModel, adapter: Adapter, dtype: torch.dtype,
            companions: tuple[Path, ...]) -> tuple[HFModel, Adapter]:
    """The base and adapter under Hugging Face names, with a config.json for transformers."""
    where = str(base.path / CONFIG_FILE)
    family = family_of(base.config, where)
    attention = Attention.from_config(base.config, base.path / CONFIG_FILE)
    if family.fused_qkv and attention.n_query_groups != attention.n_head:
        raise InputError(f"{where}: {family.architecture} has no grouped-query attention; n_query_groups is "
                         f"{attention.n_query_groups}, n_head {attention.n_head}")
    targets = {name: hf_targets(name, family, attention) for name in base.tensors}
    modules: dict[str, LoraModule] = {}
    for lora in adapter.modules.values():
        weight = f"{lora.module}.weight"
        if weight not in targets:
            raise InputError(f"{lora.a.path}: module {lora.module!r} has no weight in the base model {base.path}")
        modules.update(_remap(lora, targets[weight]))
    hf_adapter = dataclasses.replace(adapter, modules=modules)
    changed = _targets_of(hf_adapter)
    sources: dict[str, Source] = {}
    for name, ref in base.tensors.items():
        for hf_name, ranges in targets[name]:
            pieces = [ref] if ranges is None else [slice_rows(ref, start, stop) for start, stop in ranges]
            sources[hf_name] = _source(hf_name, pieces, dtype if hf_name in changed else None)
    config = hf_config(base.config, family, attention, tied="lm_head.weight" not in base.tensors, dtype=dtype,
                       original=next((read_json(p) for p in companions if p.name == "config.json"), {}))
    kept = tuple(p for p in companions if p.name not in ("config.json", CONFIG_FILE))
    return dataclasses.replace(base, config=config, sources=sources, companion_files=kept), hf_adapter


def hf_config(c: dict[str, Any], family: Family, attention: Attention, *, tied: bool, dtype: torch.dtype,
              original: dict[str, Any]) -> dict[str, Any]:
    """A config.json transformers builds the same model from; token ids kept from the original one, if any."""
    config: dict[str, Any] = {"architectures": [family.architecture], "model_type": family.model_type,
                              "vocab_size": c.get("padded_vocab_size") or c["vocab_size"],
                              **family.config(c, attention), "tie_word_embeddings": tied,
                              "torch_dtype": dtype_name(dtype), "dtype": dtype_name(dtype)}
    config.update({k: original[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in original})
    return config

