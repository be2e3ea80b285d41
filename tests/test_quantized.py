"""bitsandbytes checkpoints (NF4/FP4, with and without double quantization, int8) read and merged dense.

Decoding is compared with bitsandbytes itself; merges with PEFT's merge on bitsandbytes' own dequantization.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import Case, build_case, load_output, tiny_llama

import lorastream
from lorastream.codecs.bnb4 import Bnb4Source
from lorastream.codecs.int8 import Int8Source
from lorastream.formats.hf import open_hf_model

bnb = pytest.importorskip("bitsandbytes")
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

FOUR_BIT = {
    "nf4-double": dict(bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "nf4": dict(bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False),
    "fp4-double": dict(bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True),
    "nf4-bf16-storage": dict(bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_quant_storage=torch.bfloat16),
}
BIG = 1 << 26


def quantize(case_base: Path, out: Path, **config: object) -> torch.nn.Module:
    """Save `case_base` quantized by transformers + bitsandbytes, as a user's QLoRA base would be."""
    if "load_in_8bit" not in config:
        config = {"load_in_4bit": True, "bnb_4bit_compute_dtype": torch.bfloat16, **config}
    model = AutoModelForCausalLM.from_pretrained(case_base, quantization_config=BitsAndBytesConfig(**config),
                                                 dtype=torch.bfloat16)
    model.save_pretrained(out)
    return model


def linear_weights(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {f"{name}.weight": module.weight for name, module in model.named_modules()
            if isinstance(module, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt)}


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    """Inner dimensions that are multiples of 64, where bitsandbytes' CPU kernels are right."""
    return build_case(tmp_path_factory.mktemp("q"), tiny_llama(hidden_size=128, intermediate_size=320),
                      torch.bfloat16, target_modules=["q_proj", "v_proj", "down_proj", "up_proj"], r=8, lora_alpha=16)


@pytest.mark.parametrize("variant", list(FOUR_BIT))
def test_4bit_decode_equals_bitsandbytes(case: Case, tmp_path: Path, variant: str) -> None:
    model = quantize(case.base, tmp_path / "q", **FOUR_BIT[variant])
    sources = open_hf_model(tmp_path / "q").sources
    weights = linear_weights(model)
    assert weights
    for name, param in weights.items():
        source = sources[name]
        assert isinstance(source, Bnb4Source)
        expected = bnb.functional.dequantize_4bit(param.data, param.quant_state)
        whole = source.read_rows(0, source.rows, memoryview(bytearray(BIG)))
        assert torch.equal(whole, expected), name
        # aligned row blocks decode to the same rows
        step = 40 * source.row_alignment
        blocks = [source.read_rows(s, min(s + step, source.rows), memoryview(bytearray(BIG))).clone()
                  for s in range(0, source.rows, step)]
        assert torch.equal(torch.cat(blocks), expected), name


def test_4bit_inner_dim_not_multiple_of_64_follows_documented_formula(tmp_path: Path) -> None:
    """bitsandbytes 0.50's CPU kernel is wrong here; its default (reference) kernel is the formula we follow."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    base = build_case(tmp_path / "odd", tiny_llama(hidden_size=96, intermediate_size=200), torch.bfloat16,
                      target_modules=["q_proj"], r=2, lora_alpha=4).base
    model = quantize(base, tmp_path / "q", bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    sources = open_hf_model(tmp_path / "q").sources
    for name, param in linear_weights(model).items():
        state = param.quant_state
        absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
        expected = _dequantize_4bit_compute(param.data.view(torch.uint8).reshape(-1), absmax.float(),
                                            _get_4bit_code("nf4", absmax.device), state.blocksize, state.shape,
                                            state.dtype)
        source = sources[name]
        assert torch.equal(source.read_rows(0, source.rows, memoryview(bytearray(BIG))), expected), name
        if source.row_alignment > 1:  # e.g. 96 columns: blocks start every 2 rows
            rows = 3 * source.row_alignment
            assert torch.equal(source.read_rows(rows, 2 * rows, memoryview(bytearray(BIG))), expected[rows:2 * rows])


def test_int8_decode_equals_bitsandbytes(case: Case, tmp_path: Path) -> None:
    model = quantize(case.base, tmp_path / "q", load_in_8bit=True)
    sources = open_hf_model(tmp_path / "q").sources
    for name, param in linear_weights(model).items():
        source = sources[name]
        assert isinstance(source, Int8Source)
        expected = bnb.functional.int8_vectorwise_dequant(param.data, param.SCB)
        assert torch.equal(source.read_rows(0, source.rows, memoryview(bytearray(BIG))), expected), name


def dequantized_model(case: Case, quantized: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """The dense model whose quantized weights are what bitsandbytes dequantizes them to (PEFT's helper)."""
    from peft.utils.integrations import dequantize_bnb_weight

    dense = case.model_class.from_pretrained(case.base, dtype=dtype)
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt):
                state = module.weight.quant_state if isinstance(module, bnb.nn.Linear4bit) else module.state
                dense.get_parameter(f"{name}.weight").copy_(dequantize_bnb_weight(module.weight, state))
    return dense


def peft_merge_on_dequantized(case: Case, quantized: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """PEFT's merge onto bitsandbytes' own dequantization."""
    from peft import PeftModel

    dense = dequantized_model(case, quantized, dtype)
    return PeftModel.from_pretrained(dense, case.adapter).merge_and_unload().state_dict()


@pytest.mark.parametrize("variant", ["nf4-double", "fp4-double"])
def test_merge_into_4bit_base_writes_dense(case: Case, tmp_path: Path, variant: str) -> None:
    model = quantize(case.base, tmp_path / "q", **FOUR_BIT[variant])
    lorastream.merge(tmp_path / "q", case.adapter, tmp_path / "out")
    ours = load_output(tmp_path / "out")
    reference = peft_merge_on_dequantized(case, model, torch.bfloat16)
    assert set(ours) == set(reference)
    for name, tensor in ours.items():
        assert tensor.dtype == torch.bfloat16, name
        assert torch.equal(tensor, reference[name]), name
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert not hasattr(loaded.model.layers[0].self_attn.q_proj.weight, "quant_state")


def test_merge_into_int8_base_writes_dense(case: Case, tmp_path: Path) -> None:
    """int8 decodes to float32 (bitsandbytes' vectorwise dequantization); with --dtype float32 the merge is
    PEFT's on that float32 weight."""
    model = quantize(case.base, tmp_path / "q", load_in_8bit=True)
    lorastream.merge(tmp_path / "q", case.adapter, tmp_path / "out", dtype="float32")
    ours = load_output(tmp_path / "out")
    reference = peft_merge_on_dequantized(case, model, torch.float32)
    adapted = [n for n in linear_weights(model) if any(m in n for m in ("q_proj", "v_proj", "down_proj", "up_proj"))]
    assert adapted
    for name in linear_weights(model):
        assert torch.equal(ours[name], reference[name]), name


def test_plan_and_inspect_know_quantized_tensors(case: Case, tmp_path: Path) -> None:
    quantize(case.base, tmp_path / "q", **FOUR_BIT["nf4-double"])
    info = lorastream.inspect(tmp_path / "q")
    assert info["quantization"]["quant_method"] == "bitsandbytes"
    job = lorastream.plan(tmp_path / "q", case.adapter, tmp_path / "out", max_memory="1GiB")
    q_proj = next(t for t in job.tensors if t.name == "model.layers.0.self_attn.q_proj.weight")
    assert isinstance(q_proj.source, Bnb4Source)
    assert q_proj.source.stored_bytes < q_proj.nbytes // 3  # packed on disk, dense in the output
    assert not any(".absmax" in t.name or "quant_state" in t.name for t in job.tensors)
