"""Merged values equal PEFT's own `merge_and_unload()` for every setting that changes them.

Bit-identical unless a test says otherwise; each tolerance is explained where it is allowed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import Case, CaseFactory, load_output, peft_reference, tiny_gpt2, tiny_llama

import lorastream

LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
pytestmark = pytest.mark.usefixtures("smallest_blocks")


def merge(case: Case, out: Path, **options: object) -> dict[str, torch.Tensor]:
    lorastream.merge(case.base, case.adapter, out, **options)
    return load_output(out)


def assert_identical(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
                     tied: tuple[str, ...] = ()) -> None:
    assert set(ours) == set(reference) - set(tied)
    for name, tensor in ours.items():
        expected = reference[name]
        assert tensor.dtype == expected.dtype, name
        assert torch.equal(tensor, expected), f"{name}: max diff {(tensor.float() - expected.float()).abs().max()}"


def assert_adapter_changed(ours: dict[str, torch.Tensor], case: Case, names: list[str]) -> None:
    """Guard against a vacuous pass: the adapted tensors really differ from the base."""
    base = load_output(case.base) if any(case.base.glob("*.safetensors")) else torch.load(
        case.base / "pytorch_model.bin")
    for name in names:
        assert not torch.equal(ours[name], base[name]), f"{name} was not changed by the merge"


def test_plain_lora_bf16_base_fp32_adapter(make_case: CaseFactory, tmp_path: Path) -> None:
    case = make_case(tiny_llama(), target_modules=LLAMA_LINEARS, r=8, lora_alpha=16)
    ours = merge(case, tmp_path / "out", max_shard_size="200KB")
    model, reference = peft_reference(case)
    assert_identical(ours, reference)
    assert_adapter_changed(ours, case, ["model.layers.0.self_attn.q_proj.weight",
                                        "model.layers.1.mlp.down_proj.weight"])
    assert len(list((tmp_path / "out").glob("model-*-of-*.safetensors"))) > 1

    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert loaded.dtype == torch.bfloat16
    tokens = torch.randint(0, 384, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)


def test_rslora_rank_and_alpha_patterns(make_case: CaseFactory, tmp_path: Path) -> None:
    case = make_case(tiny_llama(), target_modules=LLAMA_LINEARS, r=8, lora_alpha=16, use_rslora=True,
                     rank_pattern={"q_proj": 4, "layers.1.mlp.down_proj": 12}, alpha_pattern={"v_proj": 7})
    info = lorastream.inspect(case.adapter)
    assert info["modules"]["model.layers.1.mlp.down_proj"]["rank"] == 12
    assert info["modules"]["model.layers.0.self_attn.q_proj"]["rank"] == 4
    assert info["modules"]["model.layers.0.self_attn.v_proj"]["scale"] == pytest.approx(7 / 8**0.5)
    assert_identical(merge(case, tmp_path / "out"), peft_reference(case)[1])


def test_adapter_saved_in_bf16_is_upcast_like_peft(make_case: CaseFactory, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    case = make_case(tiny_llama(), target_modules=["q_proj", "down_proj"], r=4, lora_alpha=8)
    path = case.adapter / "adapter_model.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(path).items()}, path)
    assert_identical(merge(case, tmp_path / "out"), peft_reference(case)[1])


def test_dora_linear(make_case: CaseFactory, tmp_path: Path) -> None:
    case = make_case(tiny_llama(), target_modules=LLAMA_LINEARS, r=8, lora_alpha=16, use_dora=True)
    ours = merge(case, tmp_path / "out")
    assert_identical(ours, peft_reference(case)[1])
    assert_adapter_changed(ours, case, ["model.layers.0.mlp.gate_proj.weight"])


def test_lora_bias_modules_to_save_and_trained_biases(make_case: CaseFactory, tmp_path: Path) -> None:
    case = make_case(tiny_llama(attention_bias=True), target_modules=["q_proj", "v_proj", "o_proj"], r=4,
                     lora_alpha=8, lora_bias=True, modules_to_save=["lm_head"], bias="lora_only")
    ours = merge(case, tmp_path / "out")
    assert_identical(ours, peft_reference(case)[1])
    assert_adapter_changed(ours, case, ["lm_head.weight", "model.layers.0.self_attn.q_proj.bias",
                                        "model.layers.1.self_attn.o_proj.bias"])


def test_lora_bias_without_base_bias_is_refused(make_case: CaseFactory, tmp_path: Path) -> None:
    case = make_case(tiny_llama(attention_bias=True), target_modules=["q_proj"], r=4, lora_alpha=8, lora_bias=True)
    from safetensors.torch import load_file, save_file

    path = case.base / "model.safetensors"
    save_file({k: v for k, v in load_file(path).items() if not k.endswith("q_proj.bias")}, path,
              metadata={"format": "pt"})
    with pytest.raises(lorastream.InputError, match="lora_bias needs a bias"):
        lorastream.merge(case.base, case.adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_embedding_lora_fp32_base_is_exact(make_case: CaseFactory, tmp_path: Path) -> None:
    case = make_case(tiny_llama(), torch.float32, target_modules=["embed_tokens", "q_proj"], r=4, lora_alpha=8)
    ours = merge(case, tmp_path / "out")
    assert_identical(ours, peft_reference(case)[1])
    assert_adapter_changed(ours, case, ["model.embed_tokens.weight"])


def test_embedding_lora_bf16_base_rounds_once(make_case: CaseFactory, tmp_path: Path) -> None:
    """PEFT's Embedding.merge rounds the delta to bf16 before adding it (two roundings); lorastream adds in
    float32 and rounds once, as for Linear layers. The gap is at most half a bf16 step of the delta plus
    half a step of the result, bounded here by eps·(|result| + |base|), since |delta| <= |result| + |base|."""
    case = make_case(tiny_llama(), target_modules=["embed_tokens"], r=4, lora_alpha=8)
    ours = merge(case, tmp_path / "out")
    reference = peft_reference(case)[1]
    name = "model.embed_tokens.weight"
    base = load_output(case.base)[name].float()
    eps = torch.finfo(torch.bfloat16).eps
    gap = (ours[name].float() - reference[name].float()).abs()
    assert (gap <= eps * (reference[name].float().abs() + base.abs())).all()
    assert gap.max() > 0, "PEFT's double rounding should show somewhere; otherwise this test proves nothing"
    del ours[name], reference[name]
    assert_identical(ours, reference)


def test_gpt2_conv1d_is_transposed_by_the_base_layer(make_case: CaseFactory, tmp_path: Path) -> None:
    # fan_in_fan_out deliberately omitted from the config: lorastream decides from the base weights.
    case = make_case(tiny_gpt2(), target_modules=["c_attn", "c_proj", "c_fc"], r=4, lora_alpha=8)
    ours = merge(case, tmp_path / "out")
    assert_identical(ours, peft_reference(case)[1], tied=("lm_head.weight",))
    assert_adapter_changed(ours, case, ["transformer.h.0.attn.c_attn.weight", "transformer.h.1.attn.c_proj.weight"])


def test_gpt2_dora_conv1d_single_block_is_exact(make_case: CaseFactory, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import lorastream.planner

    monkeypatch.setattr(lorastream.planner, "MAX_BLOCK_ELEMENTS", 1 << 22)
    case = make_case(tiny_gpt2(), target_modules=["c_attn", "c_proj"], r=4, lora_alpha=8, use_dora=True)
    assert_identical(merge(case, tmp_path / "out"), peft_reference(case)[1], tied=("lm_head.weight",))


def test_gpt2_dora_conv1d_in_row_blocks_within_one_rounding(make_case: CaseFactory, tmp_path: Path) -> None:
    """A transposed DoRA weight split into row blocks needs its column norms from a first pass; summing
    squares per block in float64 instead of torch's one-shot float32 norm can move a value by one
    output rounding step."""
    case = make_case(tiny_gpt2(), torch.float32, target_modules=["c_fc"], r=4, lora_alpha=8, use_dora=True)
    ours = merge(case, tmp_path / "out")
    reference = peft_reference(case)[1]
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, reference[name], rtol=4 * torch.finfo(torch.float32).eps, atol=1e-7)


def test_pytorch_bin_base_and_adapter(make_case: CaseFactory, tmp_path: Path) -> None:
    case = make_case(tiny_llama(), target_modules=LLAMA_LINEARS, r=4, lora_alpha=8, safe_serialization=False)
    assert (case.base / "pytorch_model.bin").exists() and (case.adapter / "adapter_model.bin").exists()
    assert_identical(merge(case, tmp_path / "out"), peft_reference(case)[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_output_dtype_override(make_case: CaseFactory, tmp_path: Path, dtype: torch.dtype) -> None:
    """`--dtype` converts the base on read, as loading it in that dtype before PEFT's merge does."""
    case = make_case(tiny_llama(), target_modules=["q_proj", "up_proj"], r=4, lora_alpha=8)
    ours = merge(case, tmp_path / "out", dtype=str(dtype).removeprefix("torch."))
    assert_identical(ours, peft_reference(case, dtype)[1])
    import json

    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")


def test_weighted_adapters_sum_their_deltas(make_case: CaseFactory, tmp_path: Path) -> None:
    """Two adapters with weights: W + 0.7·ΔW1 + 0.3·ΔW2 equals merging each delta in turn with PEFT."""
    from peft import LoraConfig, PeftModel, get_peft_model

    case = make_case(tiny_llama(), target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8)
    model = case.model_class.from_pretrained(case.base, dtype=torch.float32)
    second = get_peft_model(model, LoraConfig(init_lora_weights=False, target_modules=["q_proj", "down_proj"], r=2,
                                              lora_alpha=2))
    second.save_pretrained(tmp_path / "second")
    lorastream.merge(case.base, [case.adapter, tmp_path / "second"], tmp_path / "out", weights=[0.7, 0.3],
                     dtype="float32")
    ours = load_output(tmp_path / "out")
    model = case.model_class.from_pretrained(case.base, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(model, case.adapter, adapter_name="a")
    peft_model.load_adapter(tmp_path / "second", adapter_name="b")
    peft_model.add_weighted_adapter(["a", "b"], [0.7, 0.3], "ab", combination_type="cat")
    peft_model.set_adapter("ab")
    reference = peft_model.merge_and_unload(adapter_names=["ab"]).state_dict()
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, reference[name], rtol=1e-6, atol=1e-6)
