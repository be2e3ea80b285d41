"""The Hugging Face architectures LitGPT models convert to, as litgpt's `convert_lit_checkpoint` converts them.

One `Family` per architecture: how it names LitGPT's modules, how it lays out the fused qkv (split into
q/k/v_proj, kept fused as [Q; K; V], or re-interleaved per query group), which LitGPT tensors it stacks into
one (Phi-3's gate_up_proj), whether it ties lm_head to the embedding, and the config.json transformers builds
the same model from. `family_of` picks the family by the converter's own dispatch on the model name, then
refuses any LitGPT setting the family's transformers class does not compute.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError
from .formats.litgpt import Attention

Config = dict[str, Any]


@dataclass(frozen=True)
class Family:
    """How one Hugging Face architecture names and lays out LitGPT's tensors."""

    model_type: str
    architecture: str
    top: dict[str, str]
    layer_prefix: str
    layer: dict[str, str]
    config: Callable[[Config, Attention], Config]
    qkv: str = "self_attn.{}_proj"  # "{}" -> q, k, v: split; no "{}": one fused tensor
    interleaved: bool = False  # the fused qkv re-interleaved per query group (GPT-NeoX, Falcon); else [Q; K; V]
    stacked: dict[str, tuple[str, ...]] = field(default_factory=dict)  # HF module <- LitGPT modules, along rows
    experts: str | None = None  # the per-expert module, "{e}" the expert and "{w}" its projection
    expert_names: dict[str, str] = field(default_factory=dict)
    ties_head: bool = False  # transformers ties lm_head to the embedding; litgpt's converter drops lm_head

    @property
    def fused_qkv(self) -> str | None:
        """The fused attention input's name when the family keeps q, k and v in one tensor."""
        return None if "{}" in self.qkv else self.qkv

    def stack_position(self, inner: str) -> int:
        """Where a LitGPT module goes among the modules stacked into one Hugging Face tensor (0: first or alone)."""
        for parts in self.stacked.values():
            if inner in parts:
                return parts.index(inner)
        return 0


def _rope(c: Config, **extra: Any) -> Config:
    """RoPE settings, in transformers 5's `rope_parameters` and the older top-level keys."""
    return {"rope_theta": c.get("rope_base", 10000), **extra,
            "rope_parameters": {"rope_type": "default", "rope_theta": c.get("rope_base", 10000), **extra}}


def _sizes(c: Config, attention: Attention) -> Config:
    return {"hidden_size": c["n_embd"], "intermediate_size": c["intermediate_size"],
            "num_hidden_layers": c["n_layer"], "num_attention_heads": attention.n_head,
            "num_key_value_heads": attention.n_query_groups, "head_dim": attention.head_size,
            "max_position_embeddings": c["block_size"]}


def _gelu(c: Config) -> str:
    return "gelu" if c.get("gelu_approximate", "none") == "none" else "gelu_pytorch_tanh"


def _layer_types(c: Config) -> list[str]:
    flags = c.get("sliding_window_indices") or [1] * c["n_layer"]
    window = c.get("sliding_window_size") is not None
    return ["sliding_attention" if window and flags[i] else "full_attention" for i in range(c["n_layer"])]


def _llama_config(c: Config, attention: Attention) -> Config:
    config = {**_sizes(c, attention), "rms_norm_eps": c.get("norm_eps", 1e-5), "hidden_act": "silu",
              "attention_bias": bool(c.get("bias") or c.get("attn_bias")), "mlp_bias": bool(c.get("bias"))}
    adjustments = c.get("rope_adjustments")
    if adjustments:  # Llama 3.1 and later
        scaling = {"rope_type": "llama3", "factor": adjustments["factor"],
                   "low_freq_factor": adjustments["low_freq_factor"],
                   "high_freq_factor": adjustments["high_freq_factor"],
                   "original_max_position_embeddings": adjustments["original_max_seq_len"]}
        return {**config, **_rope(c), "rope_scaling": scaling,
                "rope_parameters": {**scaling, "rope_theta": c.get("rope_base", 10000)}}
    return {**config, **_rope(c)}


def _linear_rope(c: Config, attention: Attention) -> Config:
    """Llama with LitGPT's `rope_condense_ratio` (positions divided by it): transformers' linear RoPE scaling."""
    scaling = {"rope_type": "linear", "factor": float(c["rope_condense_ratio"])}
    return {**_llama_config(c, attention), "rope_scaling": scaling,
            "rope_parameters": {**scaling, "rope_theta": c.get("rope_base", 10000)}}


def _olmo_config(c: Config, attention: Attention) -> Config:
    return {**_sizes(c, attention), "hidden_act": "silu", "attention_bias": False, "clip_qkv": None, **_rope(c)}


def _stablelm_config(c: Config, attention: Attention) -> Config:
    rotary = c.get("rotary_percentage", 0.25)
    return {**_sizes(c, attention), "hidden_act": "silu", "layer_norm_eps": c.get("norm_eps", 1e-5),
            "use_qkv_bias": False, "qk_layernorm": False, "use_parallel_residual": False,
            "partial_rotary_factor": rotary, **_rope(c, partial_rotary_factor=rotary)}


def _mistral_config(c: Config, attention: Attention) -> Config:
    return {**_llama_config(c, attention), "sliding_window": c.get("sliding_window_size")}


def _mixtral_config(c: Config, attention: Attention) -> Config:
    experts = c.get("moe_intermediate_size") or c["intermediate_size"]
    return {**_mistral_config(c, attention), "intermediate_size": experts, "num_local_experts": c["n_expert"],
            "num_experts_per_tok": c["n_expert_per_token"]}


def _qwen2_config(c: Config, attention: Attention) -> Config:
    return {**_llama_config(c, attention), "use_sliding_window": False}


def _qwen3_config(c: Config, attention: Attention) -> Config:
    return {**_llama_config(c, attention), "use_sliding_window": False}


def _qwen3_moe_config(c: Config, attention: Attention) -> Config:
    # LitGPT's router takes the softmax of the chosen experts' logits: Qwen3-MoE's with norm_topk_prob
    return {**_qwen3_config(c, attention), "moe_intermediate_size": c["moe_intermediate_size"],
            "num_experts": c["n_expert"], "num_local_experts": c["n_expert"],
            "num_experts_per_tok": c["n_expert_per_token"], "norm_topk_prob": True, "decoder_sparse_step": 1,
            "mlp_only_layers": []}


def _gemma_config(c: Config, attention: Attention) -> Config:
    return {**_sizes(c, attention), "rms_norm_eps": c.get("norm_eps", 1e-5), "hidden_act": _gelu(c),
            "hidden_activation": _gelu(c), "attention_bias": bool(c.get("bias") or c.get("attn_bias")), **_rope(c)}


def _gemma2_config(c: Config, attention: Attention) -> Config:
    return {**_gemma_config(c, attention), "query_pre_attn_scalar": c.get("attention_scores_scalar")
            or attention.head_size, "sliding_window": c.get("sliding_window_size"), "layer_types": _layer_types(c),
            "attn_logit_softcapping": c.get("attention_logit_softcapping"),
            "final_logit_softcapping": c.get("final_logit_softcapping")}


def _gemma3_config(c: Config, attention: Attention) -> Config:
    local = {"rope_type": "default", "rope_theta": c.get("rope_local_base_freq") or c.get("rope_base", 10000)}
    full: Config = {"rope_type": "default", "rope_theta": c.get("rope_base", 10000)}
    if c.get("rope_adjustments"):
        full = {**full, "rope_type": "linear", "factor": c["rope_adjustments"]["factor"]}
    config = {**_gemma2_config(c, attention), "rope_local_base_freq": local["rope_theta"],
              "rope_parameters": {"sliding_attention": local, "full_attention": full}}
    if full["rope_type"] == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": full["factor"]}
    return config


def _phi_config(c: Config, attention: Attention) -> Config:
    return {**_sizes(c, attention), "layer_norm_eps": c.get("norm_eps", 1e-5), "hidden_act": "gelu_new"
            if c.get("gelu_approximate") == "tanh" else "gelu", "qk_layernorm": False, "partial_rotary_factor":
            c.get("rotary_percentage", 0.25), **_rope(c, partial_rotary_factor=c.get("rotary_percentage", 0.25))}


def _phi3_config(c: Config, attention: Attention) -> Config:
    rotary = c.get("rotary_percentage", 1.0)
    return {**_sizes(c, attention), "rms_norm_eps": c.get("norm_eps", 1e-5), "hidden_act": "silu",
            "original_max_position_embeddings": c["block_size"], "sliding_window": c.get("sliding_window_size"),
            "partial_rotary_factor": rotary, **_rope(c, partial_rotary_factor=rotary)}


def _olmo2_config(c: Config, attention: Attention) -> Config:
    return {**_sizes(c, attention), "rms_norm_eps": c.get("norm_eps", 1e-5), "hidden_act": "silu",
            "attention_bias": False, **_rope(c)}


def _falcon_config(c: Config, attention: Attention) -> Config:
    new = not c.get("shared_attention_norm")
    return {"hidden_size": c["n_embd"], "ffn_hidden_size": c["intermediate_size"], "num_hidden_layers": c["n_layer"],
            "num_attention_heads": attention.n_head, "num_kv_heads": attention.n_query_groups,
            "new_decoder_architecture": new, "multi_query": not new and attention.n_query_groups == 1,
            "parallel_attn": True, "num_ln_in_parallel_attn": 2 if new else None, "bias": False, "alibi": False,
            "layer_norm_epsilon": c.get("norm_eps", 1e-5), "activation": "gelu",
            "max_position_embeddings": c["block_size"], **_rope(c)}


def _neox_config(c: Config, attention: Attention) -> Config:
    return {"hidden_size": c["n_embd"], "intermediate_size": c["intermediate_size"],
            "num_hidden_layers": c["n_layer"], "num_attention_heads": attention.n_head,
            "max_position_embeddings": c["block_size"], "layer_norm_eps": c.get("norm_eps", 1e-5),
            "rotary_pct": c.get("rotary_percentage", 0.25), "rotary_emb_base": c.get("rope_base", 10000),
            "use_parallel_residual": bool(c.get("parallel_residual", True)),
            "hidden_act": _gelu(c), "attention_bias": bool(c.get("bias", True))}


_LLAMA_TOP = {"transformer.wte": "model.embed_tokens", "transformer.ln_f": "model.norm", "lm_head": "lm_head"}
_LLAMA_LAYER = {"norm_1": "input_layernorm", "attn.proj": "self_attn.o_proj", "norm_2": "post_attention_layernorm",
                "mlp.fc_1": "mlp.gate_proj", "mlp.fc_2": "mlp.up_proj", "mlp.proj": "mlp.down_proj"}
_GEMMA2_LAYER = {**_LLAMA_LAYER, "post_attention_norm": "post_attention_layernorm",
                 "norm_2": "pre_feedforward_layernorm", "post_mlp_norm": "post_feedforward_layernorm"}
_QK_NORMS = {"attn.norm_q": "self_attn.q_norm", "attn.norm_k": "self_attn.k_norm"}
_EXPERT_NAMES = {"fc_1": "gate_proj", "fc_2": "up_proj", "proj": "down_proj"}


def _llama_like(model_type: str, architecture: str, config: Callable[[Config, Attention], Config],
                layer: dict[str, str] = _LLAMA_LAYER, **options: Any) -> Family:
    return Family(model_type, architecture, _LLAMA_TOP, "model.layers", layer, config, **options)


def _phi3(ties_head: bool) -> Family:
    """Phi-3 and Phi-4: q, k, v fused as [Q; K; V] and gate, up stacked, as LitGPT's own layout keeps them."""
    return _llama_like("phi3", "Phi3ForCausalLM", _phi3_config,
                       {**_LLAMA_LAYER, "mlp.fc_1": "mlp.gate_up_proj", "mlp.fc_2": "mlp.gate_up_proj"},
                       qkv="self_attn.qkv_proj", stacked={"mlp.gate_up_proj": ("mlp.fc_1", "mlp.fc_2")},
                       ties_head=ties_head)


def _falcon(norms: dict[str, str]) -> Family:
    """Falcon 7B (one layer norm shared by attention and MLP) or 40B/180B (one each: the new decoder layout)."""
    return Family("falcon", "FalconForCausalLM",
                  {"transformer.wte": "transformer.word_embeddings", "transformer.ln_f": "transformer.ln_f",
                   "lm_head": "lm_head"}, "transformer.h",
                  {**norms, "attn.proj": "self_attention.dense", "mlp.fc": "mlp.dense_h_to_4h",
                   "mlp.proj": "mlp.dense_4h_to_h"}, _falcon_config,
                  qkv="self_attention.query_key_value", interleaved=True)


FAMILIES = {
    "llama": _llama_like("llama", "LlamaForCausalLM", _llama_config),
    "llama_condensed": _llama_like("llama", "LlamaForCausalLM", _linear_rope),
    "olmo": _llama_like("olmo", "OlmoForCausalLM", _olmo_config),  # LayerNorm without weights: no norm tensors
    "stablelm": _llama_like("stablelm", "StableLmForCausalLM", _stablelm_config),
    "mistral": _llama_like("mistral", "MistralForCausalLM", _mistral_config),
    "mixtral": _llama_like("mixtral", "MixtralForCausalLM", _mixtral_config,
                           {**_LLAMA_LAYER, "mlp.gate": "block_sparse_moe.gate"},
                           experts="block_sparse_moe.experts.{e}.{w}",
                           expert_names={"fc_1": "w1", "fc_2": "w3", "proj": "w2"}),
    "qwen2": _llama_like("qwen2", "Qwen2ForCausalLM", _qwen2_config),
    "qwen3": _llama_like("qwen3", "Qwen3ForCausalLM", _qwen3_config, {**_LLAMA_LAYER, **_QK_NORMS}),
    "qwen3_moe": _llama_like("qwen3_moe", "Qwen3MoeForCausalLM", _qwen3_moe_config,
                             {**_LLAMA_LAYER, **_QK_NORMS, "mlp.gate": "mlp.gate"},
                             experts="mlp.experts.{e}.{w}", expert_names=_EXPERT_NAMES),
    "gemma": _llama_like("gemma", "GemmaForCausalLM", _gemma_config, ties_head=True),
    "gemma2": _llama_like("gemma2", "Gemma2ForCausalLM", _gemma2_config, _GEMMA2_LAYER, ties_head=True),
    "gemma3_text": _llama_like("gemma3_text", "Gemma3ForCausalLM", _gemma3_config, {**_GEMMA2_LAYER, **_QK_NORMS},
                               ties_head=True),
    "olmo2": _llama_like("olmo2", "Olmo2ForCausalLM", _olmo2_config,
                         {"attn.proj": "self_attn.o_proj", "post_attention_norm": "post_attention_layernorm",
                          "post_mlp_norm": "post_feedforward_layernorm", "mlp.fc_1": "mlp.gate_proj",
                          "mlp.fc_2": "mlp.up_proj", "mlp.proj": "mlp.down_proj", **_QK_NORMS}),
    "phi": Family("phi", "PhiForCausalLM",
                  {"transformer.wte": "model.embed_tokens", "transformer.ln_f": "model.final_layernorm",
                   "lm_head": "lm_head"}, "model.layers",
                  {"norm_1": "input_layernorm", "attn.proj": "self_attn.dense", "mlp.fc": "mlp.fc1",
                   "mlp.proj": "mlp.fc2"}, _phi_config),
    "phi3": _phi3(ties_head=False),
    "phi3_tied": _phi3(ties_head=True),
    "falcon-7b": _falcon({"norm_1": "input_layernorm"}),
    "falcon-40b": _falcon({"norm_1": "ln_attn", "norm_2": "ln_mlp"}),
    "gpt_neox": Family("gpt_neox", "GPTNeoXForCausalLM",
                       {"transformer.wte": "gpt_neox.embed_in", "transformer.ln_f": "gpt_neox.final_layer_norm",
                        "lm_head": "embed_out"}, "gpt_neox.layers",
                       {"norm_1": "input_layernorm", "attn.proj": "attention.dense",
                        "norm_2": "post_attention_layernorm", "mlp.fc": "mlp.dense_h_to_4h",
                        "mlp.proj": "mlp.dense_4h_to_h"}, _neox_config,
                       qkv="attention.query_key_value", interleaved=True),
}

# LitGPT settings under which a model is not what the family's transformers class computes (`...`: any value,
# the family's config.json carries it).
_PLAIN = {"rope_interleave": False, "rope_condense_ratio": 1, "latent_attention": None, "n_expert_groups": None,
          "n_shared_expert": None, "routed_scaling_factor": 1.0, "first_k_dense_replace": None}
_LLAMA = {**_PLAIN, "norm_class_name": "RMSNorm", "mlp_class_name": "LLaMAMLP", "parallel_residual": False,
          "rotary_percentage": 1.0, "norm_qk": False, "post_attention_norm": False, "post_mlp_norm": False,
          "scale_embeddings": False, "shared_attention_norm": False, "attention_logit_softcapping": None,
          "final_logit_softcapping": None, "n_expert": 0, "lm_head_bias": False, "norm_1": True, "norm_2": True,
          "attention_scores_scalar": None, "rope_local_base_freq": None}
_GEMMA = {**_LLAMA, "mlp_class_name": "GemmaMLP", "scale_embeddings": True, "bias": False, "attn_bias": False,
          "sliding_window_size": None, "attention_scores_scalar": None}
_GEMMA2 = {**_GEMMA, "post_attention_norm": True, "post_mlp_norm": True, "sliding_window_size": ...,
           "attention_logit_softcapping": ..., "final_logit_softcapping": ..., "attention_scores_scalar": ...}
_QWEN3 = {**_LLAMA, "norm_qk": True, "norm_qk_type": "default", "bias": False, "attn_bias": False,
          "sliding_window_size": None}
_NEOX = {**_PLAIN, "norm_class_name": "LayerNorm", "mlp_class_name": "GptNeoxMLP", "norm_qk": False,
         "post_attention_norm": False, "post_mlp_norm": False, "scale_embeddings": False,
         "shared_attention_norm": False, "lm_head_bias": False, "n_expert": 0, "attention_logit_softcapping": None,
         "final_logit_softcapping": None, "attention_scores_scalar": None, "sliding_window_size": None}
_PHI3 = {**_LLAMA, "bias": False, "attn_bias": False, "rotary_percentage": ..., "sliding_window_size": ...}
_FALCON = {**_NEOX, "parallel_residual": True, "bias": False, "attn_bias": False, "rotary_percentage": 1.0,
           "gelu_approximate": "none"}
REQUIRES: dict[str, Config] = {
    "llama": {**_LLAMA, "sliding_window_size": None},
    "llama_condensed": {**_LLAMA, "sliding_window_size": None, "rope_condense_ratio": ..., "rope_adjustments": None},
    # OLMo's LayerNorm has no weights (LitGPT's has none for a model named OLMo) and a fixed eps
    "olmo": {**_LLAMA, "norm_class_name": "LayerNorm", "norm_eps": 1e-5, "sliding_window_size": None, "bias": False,
             "attn_bias": False},
    "stablelm": {**_LLAMA, "norm_class_name": "LayerNorm", "rotary_percentage": ..., "sliding_window_size": None,
                 "bias": False, "attn_bias": False},
    "mistral": _LLAMA,
    "mixtral": {**_LLAMA, "mlp_class_name": "LLaMAMoE", "n_expert": ..., "bias": False},
    "qwen2": {**_LLAMA, "bias": False, "attn_bias": True, "sliding_window_size": None},
    "qwen3": _QWEN3,
    "qwen3_moe": {**_QWEN3, "mlp_class_name": "LLaMAMoE", "n_expert": ...},
    "gemma": _GEMMA,
    "gemma2": _GEMMA2,
    "gemma3_text": {**_GEMMA2, "norm_qk": True, "norm_qk_type": "default", "attention_logit_softcapping": None,
                    "final_logit_softcapping": None, "rope_local_base_freq": ...},
    "olmo2": {**_LLAMA, "norm_1": False, "norm_2": False, "post_attention_norm": True, "post_mlp_norm": True,
              "norm_qk": True, "norm_qk_type": "olmo2", "bias": False, "attn_bias": False,
              "sliding_window_size": None},
    "phi": {**_NEOX, "parallel_residual": True, "shared_attention_norm": True, "lm_head_bias": True,
            "bias": True, "attn_bias": False},
    "phi3": _PHI3,
    "phi3_tied": _PHI3,
    "falcon-7b": {**_FALCON, "shared_attention_norm": True, "n_query_groups": 1},
    "falcon-40b": _FALCON,
    "gpt_neox": {**_NEOX, "attention_logit_softcapping": ..., "final_logit_softcapping": ...},
}


def _converter_branch(config: Config) -> str:
    """The family `convert_lit_checkpoint` (litgpt 0.5.13) converts a model to, by its own tests on the name."""
    name, mlp = str(config.get("name", "")), config.get("mlp_class_name")
    lower = name.lower()
    if "falcon" in name:
        return "falcon-7b" if "7b" in name else "falcon-40b"
    if name.startswith("Gemma-2"):  # Gemma-2b too, which litgpt's converter then names as a Gemma 2
        return "gemma2" if config.get("post_attention_norm") else "gemma"
    if name.startswith("Gemma-3"):
        return "gemma3_text"
    if lower.startswith("phi"):
        # litgpt's converter drops lm_head of every "Phi-4*"; only Phi-4-mini ties it in Hugging Face form (the
        # 14B Phi-4-reasoning models do not: their lm_head is kept, where the converter would lose it)
        if name.startswith("Phi-4-mini"):
            return "phi3_tied"
        return "phi3" if lower.startswith(("phi-3", "phi-4")) else "phi"
    if lower.startswith(("qwen2.5", "qwq")):
        return "qwen2"
    if lower.startswith("olmo-2-"):
        return "olmo2"
    if lower.startswith("qwen3"):
        return "qwen3_moe" if mlp == "LLaMAMoE" else "qwen3"
    if mlp in ("LLaMAMLP", "GemmaMLP", "LLaMAMoE"):  # the converter's Llama names, which these classes read too
        if "Gemma" in name:
            return "gemma"
        if mlp == "LLaMAMoE":
            return "mixtral"
        if config.get("norm_class_name") == "LayerNorm":
            return "olmo" if "OLMo" in name else "stablelm"
        if lower.startswith("mistral") or config.get("sliding_window_size") is not None:  # Mathstral too
            return "mistral"
        return "llama" if config.get("rope_condense_ratio", 1) == 1 else "llama_condensed"
    return "gpt_neox"


def _check_sizes(family: Family, config: Config, attention: Attention, where: str) -> None:
    """Architectures that derive head_dim from hidden_size (some in transformers 4 only), or have no grouped-query
    attention, refuse other shapes."""
    derived = family.model_type in ("qwen2", "phi", "phi3", "olmo", "olmo2", "stablelm", "falcon", "gpt_neox")
    if derived and attention.n_head * attention.head_size != config["n_embd"]:
        raise InputError(f"{where}: {family.architecture} derives head_dim from hidden_size, but n_head "
                         f"{attention.n_head} x head_size {attention.head_size} != n_embd {config['n_embd']}")
    if family.model_type == "gpt_neox" and attention.n_query_groups != attention.n_head:
        raise InputError(f"{where}: {family.architecture} has no grouped-query attention; n_query_groups is "
                         f"{attention.n_query_groups}, n_head {attention.n_head}")
    if family.model_type == "gemma3_text" and config.get("rope_indices") not in (None,
                                                                                  config.get("sliding_window_indices")):
        raise InputError(f"{where}: rope_indices differ from sliding_window_indices; {family.architecture} uses the "
                         "local RoPE base on exactly the sliding-window layers")


def family_of(config: Config, where: str) -> Family:
    """The Hugging Face architecture a LitGPT config converts to; refused when none computes the same model."""
    key = _converter_branch(config)
    name = config.get("name")
    if key.startswith("falcon") and not any(size in str(name) for size in ("7b", "40b", "180B")):
        raise InputError(f"{where}: {name!r}: litgpt's converter knows Falcon 7b, 40b and 180B layouts only; "
                         "merge to lit_model.pth instead")
    family = FAMILIES[key]
    for setting, expected in REQUIRES[key].items():
        if expected is not ... and setting in config and config[setting] != expected:
            raise InputError(f"{where}: exporting {name!r} to Hugging Face form is not supported: {setting} is "
                             f"{config[setting]!r}, {family.architecture} needs {expected!r}, so transformers would "
                             "compute another model. Merge to lit_model.pth instead")
    _check_sizes(family, config, Attention.from_config(config, Path(where)), where)
    return family
