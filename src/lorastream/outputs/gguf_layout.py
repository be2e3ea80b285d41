"""How llama.cpp lays out a model family in GGUF: tensor names, order and types, the rows it permutes, and
the metadata keys `convert_hf_to_gguf.py` writes for it (its `set_gguf_parameters`, followed call by call
through gguf-py's own `GGUFWriter`, so keys, value types and order are the converter's).

Written by hand from the converter (llama.cpp's `conversion/` package), because the converter is a script,
not a library: gguf-py provides the names, constants and writer, not the per-family choices.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..codecs.gguf_quants import fits_blocks, gguf_module
from ..errors import InputError

# Tensors the converter drops (`prepare_tensors`: "we don't need these").
_DROPPED = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")


def _find(hparams: dict[str, Any], *keys: str) -> Any:
    return next((hparams[k] for k in keys if k in hparams), None)


def rope_parameters(hparams: dict[str, Any]) -> dict[str, Any]:
    """`TextModel.__init__`'s rope parameters: rope_parameters / rope_scaling, with the global values mirrored."""
    params = dict(hparams.get("rope_parameters", hparams.get("rope_scaling")) or {})
    if "full_attention" not in params and "sliding_attention" not in params:
        local = _find(hparams, "local_rope_theta", "rope_local_theta", "rope_theta_local", "swa_rope_theta",
                      "rope_local_base_freq")
        theta = _find(hparams, "global_rope_theta", "rope_global_theta", "rope_theta_global", "rope_theta",
                      "rotary_emb_base")
        if local is not None:
            params["sliding_attention"] = {"rope_theta": local}
        if "rope_theta" not in params and theta is not None:
            params["rope_theta"] = theta
        if "rope_type" not in params and params.get("type") is not None:
            params["rope_type"] = params["type"]
        for key, names in (("partial_rotary_factor", ("partial_rotary_factor", "rope_pct", "rope_percent")),
                           ("original_max_position_embeddings", ("original_max_position_embeddings",))):
            value = _find(hparams, *names)
            if key not in params and value is not None:
                params[key] = value
    return params


def text_parameters(writer: Any, hparams: dict[str, Any], block_count: int, file_type: int) -> None:
    """`TextModel.set_gguf_parameters` for the dense decoder families lorastream supports."""
    gguf = gguf_module()
    writer.add_block_count(block_count)
    for add, keys in ((writer.add_context_length, ("max_position_embeddings", "n_ctx", "n_positions", "max_length",
                                                   "max_sequence_length", "model_max_length")),
                      (writer.add_embedding_length, ("hidden_size", "n_embd", "dim")),
                      (writer.add_feed_forward_length, ("prefix_dense_intermediate_size", "dense_intermediate_size",
                                                        "intermediate_size", "n_inner", "hidden_dim")),
                      (writer.add_head_count, ("num_attention_heads", "n_head", "n_heads")),
                      (writer.add_head_count_kv, ("num_key_value_heads", "n_kv_heads"))):
        if (value := _find(hparams, *keys)) is not None:
            add(value)
    if hparams.get("is_causal") is False:
        writer.add_causal_attention(False)
    rope = rope_parameters(hparams)
    params = rope.get("full_attention", rope)
    rope_type, factor = params.get("rope_type"), params.get("factor")
    if rope_type == "linear" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(factor)
    elif rope_type == "yarn" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(factor)
        writer.add_rope_scaling_orig_ctx_len(params["original_max_position_embeddings"])
        for add, key in ((writer.add_rope_scaling_yarn_ext_factor, "extrapolation_factor"),
                         (writer.add_rope_scaling_yarn_attn_factor, "attention_factor"),
                         (writer.add_rope_scaling_yarn_beta_fast, "beta_fast"),
                         (writer.add_rope_scaling_yarn_beta_slow, "beta_slow")):
            value = params.get(key, params.get("attn_factor")) if key == "attention_factor" else params.get(key)
            if value is not None:
                add(value)
    elif rope_type in ("su", "longrope"):
        writer.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
    if (theta := params.get("rope_theta")) is not None:
        writer.add_rope_freq_base(theta)
    if (local := rope.get("sliding_attention", {}).get("rope_theta")) is not None:
        writer.add_rope_freq_base_swa(local)
    if (eps := _find(hparams, "rms_norm_eps", "norm_eps")) is not None:
        writer.add_layer_norm_rms_eps(eps)
    if (eps := _find(hparams, "layer_norm_eps", "layer_norm_epsilon", "norm_epsilon")) is not None:
        writer.add_layer_norm_eps(eps)
    if (head_dim := hparams.get("head_dim")) is not None:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(file_type)


def _llama_parameters(writer: Any, hparams: dict[str, Any], block_count: int, file_type: int) -> None:
    text_parameters(writer, hparams, block_count, file_type)
    writer.add_vocab_size(hparams["vocab_size"])
    writer.add_rope_dimension_count(hparams.get("head_dim") or hparams["hidden_size"] // hparams["num_attention_heads"])


def _gemma2_parameters(writer: Any, hparams: dict[str, Any], block_count: int, file_type: int) -> None:
    writer.add_context_length(hparams["max_position_embeddings"])
    writer.add_embedding_length(hparams["hidden_size"])
    writer.add_block_count(block_count)
    writer.add_feed_forward_length(hparams["intermediate_size"])
    writer.add_head_count(hparams["num_attention_heads"])
    writer.add_head_count_kv(hparams.get("num_key_value_heads", hparams["num_attention_heads"]))
    writer.add_layer_norm_rms_eps(hparams["rms_norm_eps"])
    writer.add_key_length(hparams["head_dim"])
    writer.add_value_length(hparams["head_dim"])
    writer.add_file_type(file_type)
    writer.add_attn_logit_softcapping(hparams["attn_logit_softcapping"])
    writer.add_final_logit_softcapping(hparams["final_logit_softcapping"])
    writer.add_sliding_window(hparams["sliding_window"])


def _gemma3_parameters(writer: Any, hparams: dict[str, Any], block_count: int, file_type: int) -> None:
    text_parameters(writer, hparams, block_count, file_type)
    rope = rope_parameters(hparams)
    writer.add_context_length(hparams.get("max_position_embeddings", 131072))
    writer.add_head_count(hparams.get("num_attention_heads", 8))
    writer.add_layer_norm_rms_eps(hparams.get("rms_norm_eps", 1e-6))
    writer.add_key_length(hparams.get("head_dim", 256))
    writer.add_value_length(hparams.get("head_dim", 256))
    writer.add_rope_freq_base(rope.get("full_attention", rope).get("rope_theta", 1_000_000.0))
    if final := hparams.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(final)
    if hparams.get("sliding_window_pattern") != 1:
        writer.add_sliding_window(hparams["sliding_window"])
    writer.add_head_count_kv(hparams.get("num_key_value_heads", 4))


def _phi3_parameters(writer: Any, hparams: dict[str, Any], block_count: int, file_type: int) -> None:
    rope = rope_parameters(hparams)
    n_embd, n_head = _find(hparams, "hidden_size", "n_embd"), _find(hparams, "num_attention_heads", "n_head")
    writer.add_context_length(_find(hparams, "n_positions", "max_position_embeddings"))
    writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    writer.add_embedding_length(n_embd)
    writer.add_feed_forward_length(hparams["intermediate_size"])
    writer.add_block_count(block_count)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(_find(hparams, "num_key_value_heads", "n_head_kv"))
    writer.add_layer_norm_rms_eps(hparams["rms_norm_eps"])
    writer.add_rope_dimension_count(int(rope.get("partial_rotary_factor", 1.0) * n_embd) // n_head)
    writer.add_rope_freq_base(rope.get("full_attention", rope)["rope_theta"])
    writer.add_file_type(file_type)
    writer.add_sliding_window(hparams.get("sliding_window") or 0)


Generated = list[tuple[str, np.ndarray]]


def _llama3_rope_freqs(writer: Any | None, hparams: dict[str, Any]) -> Generated:
    """`LlamaModel.generate_extra_tensors`: Llama 3.1's rope frequency factors (rope_type llama3), one per
    rotary dimension pair, which llama.cpp reads from a tensor rather than the metadata."""
    rope = rope_parameters(hparams)
    params = rope.get("full_attention", rope)
    if str(params.get("rope_type", "")).lower() != "llama3":
        return []
    dim = hparams.get("head_dim") or hparams["hidden_size"] // hparams["num_attention_heads"]
    # float32 torch arithmetic throughout, as the converter's (each factor is a 0-d float32 tensor there)
    freqs = 1.0 / (params.get("rope_theta", 10000.0) ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = params.get("factor", 8.0)
    low, high = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    context = params.get("original_max_position_embeddings", 8192)
    factors: list[Any] = []
    for freq in freqs:
        wavelength = 2 * math.pi / freq
        if wavelength < context / high:
            factors.append(1)
        elif wavelength > context / low:
            factors.append(factor)
        else:
            smooth = (context / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return [("rope_freqs.weight", torch.tensor(factors, dtype=torch.float32).numpy())]


def _phi3_rope_factors(writer: Any | None, hparams: dict[str, Any]) -> Generated:
    """`Phi3MiniModel.generate_extra_tensors`: a long-context Phi-3's rope factors as two tensors, and its
    attention factor (a key the converter sets first, while it makes them; set on `writer` when given)."""
    rope = rope_parameters(hparams)
    long_factors, short_factors = rope.get("long_factor"), rope.get("short_factor")
    if not long_factors:
        return []
    n_embd, n_head = _find(hparams, "hidden_size", "n_embd"), _find(hparams, "num_attention_heads", "n_head")
    rope_dims = int(rope.get("partial_rotary_factor", 1.0) * n_embd) // n_head
    if short_factors is None or not len(long_factors) == len(short_factors) == rope_dims // 2:
        raise InputError(f"config.json: rope_scaling long_factor and short_factor need {rope_dims // 2} values each")
    context = rope["original_max_position_embeddings"]
    scale = _find(hparams, "n_positions", "max_position_embeddings") / context
    kind = str(rope.get("rope_type", "")).lower()
    if kind in ("su", "longrope"):
        attn_factor = math.sqrt(1 + math.log(scale) / math.log(context)) if scale > 1.0 else 1.0
    elif kind == "yarn":
        attn_factor = 0.1 * math.log(scale) + 1.0 if scale > 1.0 else 1.0
    else:
        raise InputError(f"config.json: Phi-3 rope scaling type {kind!r} is not one llama.cpp converts")
    if writer is not None:
        writer.add_rope_scaling_attn_factors(attn_factor)
    return [("rope_factors_long.weight", np.array(long_factors, dtype=np.float32)),
            ("rope_factors_short.weight", np.array(short_factors, dtype=np.float32))]


def _no_tensors(writer: Any | None, hparams: dict[str, Any]) -> Generated:
    return []


Parameters = Callable[[Any, dict[str, Any], int, int], None]


@dataclass(frozen=True)
class Family:
    """A model family as llama.cpp's converter writes it.

    `arch` names gguf-py's MODEL_ARCH; `permute_qk` undoes Hugging Face's rotary row order in q/k (Llama);
    `norm_shift` is added to norm weights (Gemma stores `w - 1`); `vocab` is how the tokenizer is read:
    "llama" (SentencePiece, else a Llama tokenizer.json, else BPE), "sentencepiece_or_bpe", or "gemma"
    (SentencePiece with add_space_prefix false, else BPE); `skip` names HF tensors the converter drops;
    `generate` makes the tensors the converter computes from config.json (first in its file).
    """

    arch: str
    parameters: Parameters
    vocab: str
    permute_qk: bool = False
    norm_shift: float = 0.0
    skip: tuple[str, ...] = ()
    generate: Callable[[Any | None, dict[str, Any]], Generated] = _no_tensors


FAMILIES: dict[str, Family] = {
    "LlamaForCausalLM": Family("LLAMA", _llama_parameters, "llama", permute_qk=True, generate=_llama3_rope_freqs),
    "MistralForCausalLM": Family("LLAMA", _llama_parameters, "llama", permute_qk=True, generate=_llama3_rope_freqs),
    "Qwen2ForCausalLM": Family("QWEN2", text_parameters, "sentencepiece_or_bpe"),
    "Qwen3ForCausalLM": Family("QWEN3", text_parameters, "sentencepiece_or_bpe"),
    "Gemma2ForCausalLM": Family("GEMMA2", _gemma2_parameters, "gemma2", norm_shift=1.0, skip=("lm_head.weight",)),
    "Gemma3ForCausalLM": Family("GEMMA3", _gemma3_parameters, "gemma", norm_shift=1.0),
    "Phi3ForCausalLM": Family("PHI3", _phi3_parameters, "phi3", generate=_phi3_rope_factors),
}


def family(config: dict[str, Any], where: object) -> tuple[str, Family]:
    """The architecture config.json names and its family; anything else is refused in one line."""
    architectures = config.get("architectures") or [config.get("model_type", "?")]
    name = str(architectures[0])
    if name not in FAMILIES:
        raise InputError(f"{where}: architecture {name} cannot be written as GGUF by lorastream (supported: "
                         f"{', '.join(sorted(FAMILIES))}); merge to --format hf and convert with llama.cpp")
    return name, FAMILIES[name]


def generated_tensors(config: dict[str, Any], where: object) -> Generated:
    """The tensors the converter computes from `config` rather than reads (rope factors), in its order."""
    return family(config, where)[1].generate(None, hparams_of(config))


def hparams_of(config: dict[str, Any]) -> dict[str, Any]:
    """config.json as the converter reads it: a `text_config` lifted to the top level."""
    return {**config, **config["text_config"]} if "text_config" in config else dict(config)


def block_count(hparams: dict[str, Any]) -> int:
    return int(_find(hparams, "n_layers", "num_hidden_layers", "n_layer", "num_layers"))


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of the GGUF: its name there, its type, and how its rows are arranged. `qtype` is None for a
    weight whose type the file type decides (the converter forces F32 on the others); `hf_name` is "" for a
    tensor the converter computes from config.json (`Family.generate`) rather than reads."""

    hf_name: str
    name: str
    shape: tuple[int, ...]
    qtype: str | None
    head_rows: int = 0
    shift: float = 0.0


def tensor_name(tensor_map: Any, hf_name: str, where: object) -> str:
    name = tensor_map.get_name(key=hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise InputError(f"{where}: tensor {hf_name!r} has no name in llama.cpp's GGUF layout for this architecture")
    return str(name)


def layout(config: dict[str, Any], names: list[tuple[str, tuple[int, ...]]], where: object
           ) -> tuple[Family, list[GGUFTensor]]:
    """The GGUF tensors of a model with these (HF name, shape) tensors, in the converter's order (by name, as
    it reads a merged folder's safetensors)."""
    gguf = gguf_module()
    _, fam = family(config, where)
    hparams = hparams_of(config)
    tensor_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[fam.arch], block_count(hparams))
    n_head = _find(hparams, "n_heads", "num_attention_heads")
    n_kv_head = _find(hparams, "n_kv_heads", "num_key_value_heads") or n_head
    planned = []
    for hf_name, shape in sorted(names):
        if hf_name.endswith(_DROPPED) or hf_name in fam.skip:
            continue
        name = tensor_name(tensor_map, hf_name, where)
        forced = len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight")
        head_rows = 0
        if fam.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")):
            head_rows = shape[0] // (n_head if "q_proj" in hf_name else n_kv_head)
        shift = fam.norm_shift if hf_name.endswith("norm.weight") else 0.0
        planned.append(GGUFTensor(hf_name, name, tuple(shape), "F32" if forced else None, head_rows, shift))
    return fam, planned


def converter_types(tensors: list[GGUFTensor], dense: str, quantized: str | None) -> list[GGUFTensor]:
    """The converter's choice for each weight (`--outtype`): the file type, F16 where a row is not a whole
    number of quantization blocks (its QuantError fallback)."""
    def choose(tensor: GGUFTensor) -> str:
        if quantized is None:
            return dense
        return quantized if fits_blocks(quantized, tensor.shape[-1]) else "F16"
    return [t if t.qtype else dataclasses.replace(t, qtype=choose(t)) for t in tensors]
