"""The architectures people fine-tune, each merged by lorastream and compared with PEFT's `merge_and_unload`.

Every case is a tiny random model made from a transformers config, saved with `save_pretrained` (so the base
has transformers' on-disk layout: per-expert tensors, `language_model.` prefixes), a PEFT adapter with
`target_modules="all-linear"` (plus the case's extras: `target_parameters` on fused experts, `modules_to_save`,
`trainable_token_indices`, ...) whose every trainable tensor is random, merged by lorastream, loaded back with
`from_pretrained`, and compared parameter by parameter with PEFT's merge loaded the same way; logits are compared
on a few tokens. `FAMILIES` is also the source of docs/architectures.md (tools/architectures.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import Case, build_case, load_output

import lorastream
import lorastream.planner

SMALL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=96, max_position_embeddings=64)
MOE_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEQ2SEQ = dict(vocab_size=96, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
               decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64)
SIGLIP = {"model_type": "siglip_vision_model", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
          "num_attention_heads": 2, "image_size": 16, "patch_size": 4}


def _resize(model: torch.nn.Module) -> None:
    model.resize_token_embeddings(104)


@dataclass(frozen=True)
class Family:
    """One architecture of the matrix: how to build it tiny, the adapter's extras, what the table says of it."""

    name: str  # as the table shows it
    kind: str  # dense, MoE, vision-language, seq2seq, encoder, vocabulary
    model_class: str
    config_class: str
    config: dict[str, Any]
    lora: dict[str, Any] = field(default_factory=dict)
    dtype: torch.dtype = torch.float32
    inputs: Callable[[Any], dict[str, torch.Tensor]] | None = None
    prepare: Callable[[torch.nn.Module], None] | None = None  # between saving the base and training
    note: str = ""
    forward: Callable[[Any], Any] = lambda model: model  # the module whose logits are compared

    def build(self) -> torch.nn.Module:
        import transformers

        torch.manual_seed(0)
        config = getattr(transformers, self.config_class)(**self.config)
        return getattr(transformers, self.model_class)(config)


def _tokens(model: Any) -> dict[str, torch.Tensor]:
    vocab = model.config.get_text_config().vocab_size
    return {"input_ids": torch.randint(0, min(vocab, 90), (1, 7), generator=torch.Generator().manual_seed(3))}


def _seq2seq(model: Any) -> dict[str, torch.Tensor]:
    return {**_tokens(model), "decoder_input_ids": torch.tensor([[0, 5, 9]])}


def _audio(model: Any) -> dict[str, torch.Tensor]:
    features = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(3))
    return {"input_features": features, "decoder_input_ids": torch.tensor([[0, 5, 9]])}


def _moe(config_class: str, model_class: str, name: str, dtype: torch.dtype = torch.float32,
         **config: Any) -> Family:
    return Family(name, "MoE (fused experts)", model_class, config_class, {**SMALL, **config},
                  {"target_parameters": MOE_PARAMETERS}, dtype)


FAMILIES = [
    # dense decoders
    Family("Llama", "dense", "LlamaForCausalLM", "LlamaConfig", SMALL),
    Family("Llama (bf16)", "dense", "LlamaForCausalLM", "LlamaConfig", SMALL, dtype=torch.bfloat16),
    Family("Mistral", "dense", "MistralForCausalLM", "MistralConfig", SMALL),
    Family("Qwen2", "dense", "Qwen2ForCausalLM", "Qwen2Config", SMALL),
    Family("Qwen3", "dense", "Qwen3ForCausalLM", "Qwen3Config", {**SMALL, "head_dim": 8}),
    Family("Gemma 2", "dense", "Gemma2ForCausalLM", "Gemma2Config", {**SMALL, "head_dim": 8}),
    Family("Gemma 3 (text)", "dense", "Gemma3ForCausalLM", "Gemma3TextConfig", {**SMALL, "head_dim": 8}),
    Family("Phi-3", "dense", "Phi3ForCausalLM", "Phi3Config", {**SMALL, "pad_token_id": 0}),
    Family("Phi-2", "dense", "PhiForCausalLM", "PhiConfig", {**SMALL, "num_key_value_heads": 4}),
    Family("GPT-NeoX", "dense", "GPTNeoXForCausalLM", "GPTNeoXConfig",
           {**SMALL, "num_key_value_heads": None}),
    Family("Falcon", "dense", "FalconForCausalLM", "FalconConfig",
           {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 96}),
    Family("OPT", "dense", "OPTForCausalLM", "OPTConfig",
           {"hidden_size": 32, "ffn_dim": 48, "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 96,
            "word_embed_proj_dim": 32, "max_position_embeddings": 64}),
    Family("Bloom", "dense", "BloomForCausalLM", "BloomConfig",
           {"hidden_size": 32, "n_layer": 1, "n_head": 4, "vocab_size": 96}),
    Family("GPT-2", "dense", "GPT2LMHeadModel", "GPT2Config",
           {"n_embd": 32, "n_layer": 1, "n_head": 4, "vocab_size": 96, "n_positions": 64}),
    # mixture of experts: PEFT target_parameters on transformers' fused expert parameters
    _moe("MixtralConfig", "MixtralForCausalLM", "Mixtral", num_local_experts=3, num_experts_per_tok=2),
    _moe("MixtralConfig", "MixtralForCausalLM", "Mixtral (bf16)", torch.bfloat16, num_local_experts=3,
         num_experts_per_tok=2),
    _moe("Qwen3MoeConfig", "Qwen3MoeForCausalLM", "Qwen3-MoE", num_experts=4, num_experts_per_tok=2,
         moe_intermediate_size=24, head_dim=8),
    _moe("OlmoeConfig", "OlmoeForCausalLM", "OLMoE", num_experts=4, num_experts_per_tok=2),
    _moe("DeepseekV3Config", "DeepseekV3ForCausalLM", "DeepSeek-V3", n_routed_experts=4, num_experts_per_tok=2,
         moe_intermediate_size=16, first_k_dense_replace=0, n_group=1, topk_group=1, kv_lora_rank=16,
         q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, num_key_value_heads=4),
    _moe("GptOssConfig", "GptOssForCausalLM", "gpt-oss", num_local_experts=4, num_experts_per_tok=2, head_dim=8),
    # vision-language models: transformers renames their modules between memory and disk
    Family("LLaVA", "vision-language", "LlavaForConditionalGeneration", "LlavaConfig",
           {"text_config": {"model_type": "llama", **SMALL},
            "vision_config": {"model_type": "clip_vision_model", "hidden_size": 16, "intermediate_size": 32,
                              "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 16, "patch_size": 8,
                              "projection_dim": 16},
            "image_token_index": 95}),
    Family("Qwen2-VL", "vision-language", "Qwen2VLForConditionalGeneration", "Qwen2VLConfig",
           {"text_config": {**SMALL, "rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 2]}},
            "vision_config": {"depth": 1, "embed_dim": 16, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2,
                              "patch_size": 2, "spatial_merge_size": 1, "temporal_patch_size": 1},
            "image_token_id": 93, "video_token_id": 94, "vision_start_token_id": 95}),
    Family("Qwen2.5-VL", "vision-language", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLConfig",
           {"text_config": {**SMALL, "rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 2]}},
            "vision_config": {"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2,
                              "out_hidden_size": 32, "patch_size": 2, "spatial_merge_size": 1,
                              "temporal_patch_size": 1, "fullatt_block_indexes": [0], "window_size": 4},
            "image_token_id": 93, "video_token_id": 94, "vision_start_token_id": 95}),
    Family("Gemma 3 (vision)", "vision-language", "Gemma3ForConditionalGeneration", "Gemma3Config",
           {"text_config": {**SMALL, "head_dim": 8}, "vision_config": SIGLIP, "mm_tokens_per_image": 4,
            "image_token_index": 95, "boi_token_index": 93, "eoi_token_index": 94}),
    Family("Mistral 3", "vision-language", "Mistral3ForConditionalGeneration", "Mistral3Config",
           {"text_config": {"model_type": "mistral", **SMALL},
            "vision_config": {"model_type": "pixtral", "hidden_size": 16, "intermediate_size": 32,
                              "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 16, "patch_size": 4,
                              "head_dim": 8},
            "image_token_index": 95, "spatial_merge_size": 1}),
    Family("Llama 4", "vision-language", "Llama4ForConditionalGeneration", "Llama4Config",
           {"text_config": {**SMALL, "intermediate_size_mlp": 48, "head_dim": 8, "num_local_experts": 4,
                            "num_experts_per_tok": 1, "interleave_moe_layer_step": 1, "no_rope_layers": [1],
                            "attention_chunk_size": 16},
            "vision_config": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                              "num_attention_heads": 2, "image_size": 16, "patch_size": 8, "vision_output_dim": 32,
                              "projector_input_dim": 32, "projector_output_dim": 32, "rope_theta": 10000},
            "image_token_index": 95},
           {"target_parameters": ["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"]},
           note="MoE, experts fused on disk; logits of its language model (transformers' text-only forward fails)",
           forward=lambda model: model.language_model),
    # encoder-decoder models
    Family("T5", "seq2seq", "T5ForConditionalGeneration", "T5Config",
           {"vocab_size": 96, "d_model": 32, "d_kv": 8, "d_ff": 48, "num_layers": 1, "num_heads": 4},
           inputs=_seq2seq),
    Family("BART", "seq2seq", "BartForConditionalGeneration", "BartConfig", SEQ2SEQ, inputs=_seq2seq),
    Family("Whisper", "seq2seq", "WhisperForConditionalGeneration", "WhisperConfig",
           {**SEQ2SEQ, "num_mel_bins": 8, "max_source_positions": 16, "max_target_positions": 16, "pad_token_id": 1,
            "bos_token_id": 0, "eos_token_id": 2, "decoder_start_token_id": 0},
           inputs=_audio),
    # an encoder classifier: its new head is trained whole (modules_to_save)
    Family("BERT classifier", "encoder", "BertForSequenceClassification", "BertConfig",
           {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 4,
            "vocab_size": 96, "num_labels": 3},
           {"target_modules": ["query", "key", "value", "dense"], "modules_to_save": ["classifier"]}),
    # vocabulary and embeddings
    Family("Llama + added tokens", "vocabulary", "LlamaForCausalLM", "LlamaConfig", SMALL,
           {"modules_to_save": ["embed_tokens", "lm_head"]}, prepare=_resize,
           note="vocabulary resized to 104; config vocab_size follows"),
    Family("Llama + trainable tokens", "vocabulary", "LlamaForCausalLM", "LlamaConfig", SMALL,
           {"trainable_token_indices": [3, 17, 40]}),
    Family("Llama tied + trainable tokens", "vocabulary", "LlamaForCausalLM", "LlamaConfig",
           {**SMALL, "tie_word_embeddings": True}, {"trainable_token_indices": [3, 17, 40]}),
    Family("Llama tied + LoRA on the embedding", "vocabulary", "LlamaForCausalLM", "LlamaConfig",
           {**SMALL, "tie_word_embeddings": True}, {"target_modules": [*LLAMA_LINEARS, "embed_tokens"]}),
    Family("Llama tied + LoRA on the head", "vocabulary", "LlamaForCausalLM", "LlamaConfig",
           {**SMALL, "tie_word_embeddings": True}, {"target_modules": [*LLAMA_LINEARS, "lm_head"]}),
    Family("Llama tied + head trained whole", "vocabulary", "LlamaForCausalLM", "LlamaConfig",
           {**SMALL, "tie_word_embeddings": True}, {"modules_to_save": ["lm_head"]},
           note="written untied: tie_word_embeddings false"),
]
BY_NAME = {family.name: family for family in FAMILIES}
# What is refused, each by a test below (and listed in docs/architectures.md).
REFUSED = [
    ("Qwen3-VL-MoE (LoRA on its fused experts)", "transformers transposes those experts when it loads them "
     "(`Transpose`); lorastream maps renames and expert stacking back to the checkpoint, not that"),
    ("a model class transformers does not have (remote code)", "its in-memory module names cannot be mapped to the "
     "checkpoint's tensors without the class"),
    ("an adapter for another model", "its LoRA modules have no weight in the base; the refusal names them"),
]


@dataclass(frozen=True)
class Merged:
    case: Case
    family: Family
    out: Path


def _merge(family: Family, root: Path) -> Merged:
    lora = {"target_modules": "all-linear", "r": 4, "lora_alpha": 8, **family.lora}
    case = build_case(root, family.build(), family.dtype, prepare=family.prepare, **lora)
    case = Case(case.base, case.adapter, case.dtype, type(family.build()))
    (case.base / "tokenizer_config.json").write_text('{"from": "base"}')
    if family.prepare is not None:  # trained with added tokens: the adapter folder has the new tokenizer
        (case.adapter / "tokenizer_config.json").write_text('{"from": "adapter"}')
    with pytest.MonkeyPatch.context() as patch:  # the smallest row blocks: experts and embeddings split
        patch.setattr(lorastream.planner, "MAX_BLOCK_ELEMENTS", 1)
        lorastream.merge(case.base, case.adapter, root / "out")
    return Merged(case, family, root / "out")


@pytest.fixture(scope="session")
def merged_family(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Merged]:
    """Each family merged once per session, on first use."""
    cache: dict[str, Merged] = {}

    def get(name: str) -> Merged:
        if name not in cache:
            cache[name] = _merge(BY_NAME[name], tmp_path_factory.mktemp("family"))
        return cache[name]

    return get


def reference(case: Case, family: Family) -> torch.nn.Module:
    """PEFT's merge of the case, loaded as a user loads it."""
    from peft import PeftModel

    model = case.model_class.from_pretrained(case.base, dtype=case.dtype)
    if family.prepare is not None:
        family.prepare(model)
    return PeftModel.from_pretrained(model, case.adapter).merge_and_unload()


@pytest.mark.parametrize("name", list(BY_NAME))
def test_every_parameter_and_the_logits_equal_peft(name: str, merged_family: Callable[[str], Merged]) -> None:
    merged = merged_family(name)
    case, family = merged.case, merged.family
    ours = case.model_class.from_pretrained(merged.out, dtype=case.dtype)
    theirs = reference(case, family)
    before = case.model_class.from_pretrained(case.base, dtype=case.dtype).state_dict()
    expected, got = theirs.state_dict(), ours.state_dict()
    assert set(got) == set(expected)
    changed = 0
    for key, tensor in expected.items():
        assert got[key].dtype == tensor.dtype, key
        assert torch.equal(got[key], tensor), f"{key}: max diff {(got[key].float() - tensor.float()).abs().max()}"
        changed += key not in before or not torch.equal(tensor, before[key])
    assert changed >= 2, "the adapter changed almost nothing: the comparison would be vacuous"
    inputs = (family.inputs or _tokens)(theirs)
    with torch.no_grad():
        for param in ours.parameters():  # off the file's memory map: its alignment can change a kernel's rounding
            param.data = param.data.clone()
        assert torch.equal(family.forward(ours)(**inputs).logits, family.forward(theirs)(**inputs).logits)


def test_added_tokens_resize_the_config_and_bring_the_adapters_tokenizer(
        merged_family: Callable[[str], Merged]) -> None:
    merged = merged_family("Llama + added tokens")
    config = json.loads((merged.out / "config.json").read_text())
    assert config["vocab_size"] == 104
    assert json.loads((merged.out / "tokenizer_config.json").read_text()) == {"from": "adapter"}
    assert json.loads((merged_family("Llama").out / "tokenizer_config.json").read_text()) == {"from": "base"}


def test_a_tied_head_is_untied_only_when_the_merge_makes_it_differ(merged_family: Callable[[str], Merged]) -> None:
    untied = merged_family("Llama tied + head trained whole").out
    assert json.loads((untied / "config.json").read_text())["tie_word_embeddings"] is False
    assert "lm_head.weight" in load_output(untied)
    kept = ("Llama tied + LoRA on the head", "Llama tied + LoRA on the embedding", "Llama tied + trainable tokens")
    for name in kept:
        out = merged_family(name).out
        assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True, name
        assert "lm_head.weight" not in load_output(out), name


def _cli(*args: str) -> Any:
    from click.testing import CliRunner

    from lorastream.cli import main

    return CliRunner().invoke(main, list(args))


def test_plan_and_summary_count_changed_tensors_per_component(merged_family: Callable[[str], Merged],
                                                             tmp_path: Path) -> None:
    import logging

    vlm, moe = merged_family("Qwen2-VL"), merged_family("Mixtral")
    planned = _cli("plan", str(vlm.case.base), str(vlm.case.adapter), "-o", str(tmp_path / "vlm"), "--json")
    assert planned.exit_code == 0, planned.output
    counts = json.loads(planned.stdout)["changed"]
    assert counts["vision tower"] >= 4 and counts["projector"] >= 2 and counts["language model"] >= 7
    merged = _cli("merge", str(moe.case.base), str(moe.case.adapter), "-o", str(tmp_path / "moe"), "--json")
    assert merged.exit_code == 0, merged.output
    # 3 experts x (w1, w2, w3), one tensor each on disk; the router and attention in the language model
    assert json.loads(merged.stdout)["changed"] == {"experts": 9, "language model": 5}
    again = _cli("merge", str(moe.case.base), str(moe.case.adapter), "-o", str(tmp_path / "moe2"))
    assert "changed 14 tensors: 9 experts, 5 language model" in again.stderr
    assert sum(isinstance(h, logging.StreamHandler) for h in logging.getLogger("lorastream").handlers) == 1


def test_an_adapter_for_another_model_is_refused_naming_its_modules(merged_family: Callable[[str], Merged],
                                                                    tmp_path: Path) -> None:
    llava, llama = merged_family("LLaVA"), merged_family("Mistral")
    refused = _cli("merge", str(llama.case.base), str(llava.case.adapter), "-o", str(tmp_path / "out"))
    assert refused.exit_code == 2 and "Traceback" not in refused.output
    assert "LoRA modules have no weight in the base model" in refused.stderr
    assert "15 LoRA modules" in refused.stderr and "'model.language_model.layers.0.mlp.down_proj'" in refused.stderr
    assert not (tmp_path / "out").exists()


def test_a_model_class_transformers_does_not_have_is_refused(merged_family: Callable[[str], Merged],
                                                             tmp_path: Path) -> None:
    import shutil

    llava = merged_family("LLaVA")
    base = shutil.copytree(llava.case.base, tmp_path / "base")
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "architectures": ["MyRemoteCodeVLM"]}))
    refused = _cli("merge", str(base), str(llava.case.adapter), "-o", str(tmp_path / "out"))
    assert refused.exit_code == 2, refused.output
    assert "architectures ['MyRemoteCodeVLM'] is not a model class of transformers" in refused.stderr


def test_experts_transformers_transposes_on_load_are_refused(tmp_path: Path) -> None:
    """Qwen3-VL-MoE stores fused experts that transformers transposes when it loads them: not mapped back."""
    family = Family("Qwen3-VL-MoE", "MoE", "Qwen3VLMoeForConditionalGeneration", "Qwen3VLMoeConfig",
                    {"text_config": {**SMALL, "moe_intermediate_size": 16, "num_experts": 4, "num_experts_per_tok": 2,
                                     "head_dim": 8,
                                     "rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 2]}},
                     "vision_config": {"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2,
                                       "out_hidden_size": 32, "patch_size": 2, "spatial_merge_size": 1,
                                       "temporal_patch_size": 1, "deepstack_visual_indexes": [0]}})
    case = build_case(tmp_path, family.build(), torch.float32, target_modules=["q_proj"], r=2,
                      target_parameters=MOE_PARAMETERS)
    refused = _cli("merge", str(case.base), str(case.adapter), "-o", str(tmp_path / "out"))
    assert refused.exit_code == 2, refused.output
    assert "mlp.experts.gate_up_proj" in refused.stderr and "Transpose" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def _state(model_class: type, folder: Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    return model_class.from_pretrained(folder, dtype=dtype).state_dict()


def _merged_nf4_equals_peft(case: Case, root: Path) -> int:
    """Quantize the case's base to NF4 with transformers + bitsandbytes (as a QLoRA base is), merge the adapter into
    it, and compare with PEFT's merge onto bitsandbytes' own dequantization; the count of NF4-stored weights."""
    import bitsandbytes as bnb
    from peft import PeftModel
    from peft.utils.integrations import dequantize_bnb_weight
    from transformers import BitsAndBytesConfig

    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    quantized = case.model_class.from_pretrained(case.base, dtype=torch.bfloat16, quantization_config=nf4)
    quantized.save_pretrained(root / "nf4")
    lorastream.merge(root / "nf4", case.adapter, root / "out")
    dense = case.model_class.from_pretrained(case.base, dtype=torch.bfloat16)
    stored = 0
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                stored += 1
                dense.get_parameter(f"{name}.weight").copy_(dequantize_bnb_weight(module.weight,
                                                                                  module.weight.quant_state))
    expected = PeftModel.from_pretrained(dense, case.adapter).merge_and_unload().state_dict()
    ours = _state(case.model_class, root / "out", torch.bfloat16)
    assert set(ours) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(ours[key], tensor), key
    assert "quantization_config" not in json.loads((root / "out" / "config.json").read_text())
    return stored


def test_nf4_moe_base_merges_onto_bitsandbytes_dequantization(tmp_path: Path) -> None:
    """A QLoRA Mixtral: its attention stored NF4 (the fused experts stay dense in memory, per expert on disk)."""
    family = _moe("MixtralConfig", "MixtralForCausalLM", "Mixtral", torch.bfloat16, hidden_size=128,
                  intermediate_size=128, num_local_experts=2, num_experts_per_tok=1, head_dim=32)
    case = build_case(tmp_path, family.build(), torch.bfloat16, target_modules=["q_proj", "o_proj"], r=4,
                      lora_alpha=8, target_parameters=MOE_PARAMETERS)
    assert _merged_nf4_equals_peft(case, tmp_path) == 4


def _second_adapter(merged: Merged, folder: Path) -> Path:
    """Another adapter of the same shape for the merged case's base, with other random weights."""
    from peft import LoraConfig, get_peft_model

    model = merged.case.model_class.from_pretrained(merged.case.base, dtype=merged.case.dtype)
    torch.manual_seed(7)
    lora = {"target_modules": "all-linear", "r": 4, "lora_alpha": 8, **merged.family.lora}
    get_peft_model(model, LoraConfig(init_lora_weights=False, **lora)).save_pretrained(folder)
    return folder


def test_weighted_parameter_adapters_sum_their_deltas_as_peft_scales_them(merged_family: Callable[[str], Merged],
                                                                           tmp_path: Path) -> None:
    """`--weights 0.7 0.3` on fused-expert adapters: W + 0.7·ΔW1 + 0.3·ΔW2. PEFT's add_weighted_adapter does not
    take ParamWrapper layers; its equivalent is each adapter's scale set to its weight (`set_scale`), both merged."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    merged = merged_family("Mixtral")
    case, second = merged.case, _second_adapter(merged, tmp_path / "second")
    lorastream.merge(case.base, [case.adapter, second], tmp_path / "out", weights=[0.7, 0.3])
    peft_model = PeftModel.from_pretrained(case.model_class.from_pretrained(case.base), case.adapter, adapter_name="a")
    peft_model.load_adapter(second, adapter_name="b")
    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            for name, weight in (("a", 0.7), ("b", 0.3)):
                if name in module.scaling:
                    module.set_scale(name, weight)
    expected = peft_model.merge_and_unload(adapter_names=["a", "b"]).state_dict()
    ours = _state(case.model_class, tmp_path / "out")
    experts = "model.layers.0.mlp.experts.gate_up_proj"
    assert not torch.equal(ours[experts], _state(case.model_class, merged.out)[experts])
    for key, tensor in expected.items():  # PEFT adds one adapter after the other: one rounding apart
        torch.testing.assert_close(ours[key], tensor, rtol=1e-6, atol=1e-6)


def test_each_on_moe_adapters_equals_merging_each_alone(merged_family: Callable[[str], Merged],
                                                        tmp_path: Path) -> None:
    merged = merged_family("Mixtral")
    second = _second_adapter(merged, tmp_path / "second")
    (tmp_path / "first").symlink_to(merged.case.adapter)
    lorastream.merge_each(merged.case.base, [tmp_path / "first", second], tmp_path / "each")
    lorastream.merge(merged.case.base, second, tmp_path / "alone")
    for each, alone in ((tmp_path / "each" / "first", merged.out), (tmp_path / "each" / "second", tmp_path / "alone")):
        assert load((each / "model.safetensors").read_bytes()) == load((alone / "model.safetensors").read_bytes())
        assert (each / "config.json").read_bytes() == (alone / "config.json").read_bytes()


@pytest.mark.parametrize("name", ["Mixtral", "LLaVA"])
def test_remote_inputs_and_output_equal_the_local_merge(name: str, merged_family: Callable[[str], Merged]) -> None:
    """Base and adapter read from, and the output written to, fsspec's in-memory filesystem."""
    import fsspec

    merged = merged_family(name)
    fs = fsspec.filesystem("memory")
    root = f"/families/{name}"
    fs.put(str(merged.case.base), f"{root}/base", recursive=True)
    fs.put(str(merged.case.adapter), f"{root}/adapter", recursive=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lorastream.planner, "MAX_BLOCK_ELEMENTS", 1)
        lorastream.merge(f"memory://{root}/base", f"memory://{root}/adapter", f"memory://{root}/out")
    ours = fs.cat_file(f"{root}/out/model.safetensors")
    assert load(ours) == load((merged.out / "model.safetensors").read_bytes())


def load(data: bytes) -> dict[str, bytes]:
    """A safetensors file's tensors as bytes (its metadata names the input paths, so it is left out)."""
    from safetensors.torch import load

    return {k: v.view(torch.uint8).numpy().tobytes() for k, v in load(data).items()}


def test_the_architecture_tables_are_current() -> None:
    import subprocess
    import sys

    tool = Path(__file__).resolve().parent.parent / "tools" / "architectures.py"
    done = subprocess.run([sys.executable, str(tool), "--check"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def test_nf4_vision_language_base_merges_onto_bitsandbytes_dequantization(tmp_path: Path) -> None:
    """A QLoRA LLaVA: language model, vision tower and projector stored NF4 under their on-disk names
    (`language_model.model.layers...`), the adapter naming them as transformers does in memory."""
    text = {**SMALL, "hidden_size": 64, "intermediate_size": 128, "head_dim": 16}
    family = Family("LLaVA", "vision-language", "LlavaForConditionalGeneration", "LlavaConfig",
                    {"text_config": {"model_type": "llama", **text},
                     "vision_config": {"model_type": "clip_vision_model", "hidden_size": 64, "intermediate_size": 128,
                                       "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 16,
                                       "patch_size": 8, "projection_dim": 64},
                     "image_token_index": 95})
    case = build_case(tmp_path, family.build(), torch.bfloat16, target_modules="all-linear", r=4, lora_alpha=8)
    assert _merged_nf4_equals_peft(case, tmp_path) >= 12, "the towers and the projector are stored NF4"


def test_quantized_moe_output_keeps_fused_experts_dense(merged_family: Callable[[str], Merged], tmp_path: Path) -> None:
    """`--quantize nf4` writes what transformers + bitsandbytes would: linear layers 4-bit, fused expert parameters
    (per-expert tensors on disk) dense, since bitsandbytes quantizes `nn.Linear` only; transformers loads it."""
    merged = merged_family("Mixtral (bf16)")
    lorastream.merge(merged.case.base, merged.case.adapter, tmp_path / "out", quantize="nf4")
    ours, dense = load_output(tmp_path / "out"), load_output(merged.out)
    expert = "model.layers.0.block_sparse_moe.experts.1.w3.weight"
    assert torch.equal(ours[expert], dense[expert])
    assert ours["model.layers.0.self_attn.q_proj.weight"].dtype == torch.uint8
    loaded = merged.case.model_class.from_pretrained(tmp_path / "out")
    assert torch.equal(loaded.model.layers[0].mlp.experts.down_proj[1],
                       dense["model.layers.0.block_sparse_moe.experts.1.w2.weight"])


@pytest.mark.parametrize("name", ["Mixtral", "Qwen2-VL"])
def test_checkpoint_layouts_are_cached_as_worked_out(name: str, merged_family: Callable[[str], Merged],
                                                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers' layout of a base (fused experts; towers renamed on load) is kept in the cache: read back
    equal, used without transformers' rules, and worked out again when the file is unreadable."""
    from lorastream.formats.hf import open_hf_model
    from lorastream.inputs import targets
    from lorastream.io.locations import location

    monkeypatch.setenv("LORASTREAM_CACHE", str(tmp_path))
    base = open_hf_model(location(merged_family(name).case.base))
    worked_out = targets.checkpoint_layout(base)
    [cached] = (tmp_path / "layouts").iterdir()
    with monkeypatch.context() as patch:
        patch.setattr(targets, "_checkpoint_layout", lambda _: pytest.fail("the layout was not read from the cache"))
        assert targets.checkpoint_layout(base) == worked_out
    cached.write_text("{")
    assert targets.checkpoint_layout(base) == worked_out
    assert json.loads(cached.read_text())["linear"] == sorted(worked_out.linear)
