"""The architectures people fine-tune, each merged by lorastream and compared with PEFT's `merge_and_unload`.

Every case is a tiny random model made from a transformers config, saved with `save_pretrained` (so the base
has transformers' on-disk layout: per-expert tensors, `language_model.` prefixes), a PEFT adapter with
`target_modules="all-linear"` (plus the case's extras: `target_parameters` on fused experts, `modules_to_save`,
`trainable_token_indices`, ...) whose every trainable tensor is random, merged by lorastream, loaded back with
`from_pretrained`, and compared parameter by parameter with PEFT's merge loaded the same way; logits are compared
on a few tokens. `FAMILIES` is also the source of docs/architectures.md (tools/architectures.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import Case, build_case

import lorastream

SMALL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=96, max_position_embeddings=64)
MOE_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


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
    note: str = ""

    def build(self) -> torch.nn.Module:
        import transformers

        torch.manual_seed(0)
        config = getattr(transformers, self.config_class)(**self.config)
        return getattr(transformers, self.model_class)(config)


def _tokens(model: Any) -> dict[str, torch.Tensor]:
    vocab = model.config.get_text_config().vocab_size
    return {"input_ids": torch.randint(0, vocab, (1, 7), generator=torch.Generator().manual_seed(3))}


FAMILIES = [
    Family("Llama", "dense", "LlamaForCausalLM", "LlamaConfig", SMALL),
    Family("Mixtral", "MoE (fused experts)", "MixtralForCausalLM", "MixtralConfig",
           {**SMALL, "num_local_experts": 3, "num_experts_per_tok": 2},
           {"target_parameters": MOE_PARAMETERS}),
    Family("Mixtral (bf16)", "MoE (fused experts)", "MixtralForCausalLM", "MixtralConfig",
           {**SMALL, "num_local_experts": 3, "num_experts_per_tok": 2},
           {"target_parameters": MOE_PARAMETERS}, dtype=torch.bfloat16),
    Family("Qwen3-MoE", "MoE (fused experts)", "Qwen3MoeForCausalLM", "Qwen3MoeConfig",
           {**SMALL, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24, "head_dim": 8},
           {"target_parameters": MOE_PARAMETERS}),
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
]


@dataclass(frozen=True)
class Merged:
    case: Case
    family: Family
    out: Path


def _merge(family: Family, root: Path) -> Merged:
    lora = {"target_modules": "all-linear", "r": 4, "lora_alpha": 8, **family.lora}
    case = build_case(root, family.build(), family.dtype, **lora)
    case = Case(case.base, case.adapter, case.dtype, type(family.build()))
    lorastream.merge(case.base, case.adapter, root / "out")
    return Merged(case, family, root / "out")


@pytest.fixture(scope="module", params=FAMILIES, ids=[f.name for f in FAMILIES])
def merged(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Merged:
    return _merge(request.param, tmp_path_factory.mktemp(request.param.model_class))


def test_every_parameter_and_the_logits_equal_peft(merged: Merged) -> None:
    from peft import PeftModel

    case, family = merged.case, merged.family
    ours = case.model_class.from_pretrained(merged.out, dtype=case.dtype)
    base = case.model_class.from_pretrained(case.base, dtype=case.dtype)
    reference = PeftModel.from_pretrained(case.model_class.from_pretrained(case.base, dtype=case.dtype),
                                          case.adapter).merge_and_unload()
    expected, got, before = reference.state_dict(), ours.state_dict(), base.state_dict()
    assert set(got) == set(expected)
    changed = 0
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), f"{name}: max diff {(got[name].float() - tensor.float()).abs().max()}"
        changed += not torch.equal(tensor, before[name])
    assert changed >= 4, "the adapter changed almost nothing: the comparison would be vacuous"
    inputs = (family.inputs or _tokens)(reference)
    with torch.no_grad():
        assert torch.equal(ours(**inputs).logits, reference(**inputs).logits)
