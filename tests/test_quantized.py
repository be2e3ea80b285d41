"""bitsandbytes checkpoints (NF4/FP4, with and without double quantization, int8) read and merged dense.

Decoding is compared with bitsandbytes itself; merges with PEFT's merge on bitsandbytes' own dequantization.
"""

from __future__ import annotations

import json
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from conftest import IN_PROCESS_BUDGET, Case, build_case, load_output, tiny_llama
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import lorastream
from lorastream.codecs import bnb4
from lorastream.codecs.bnb4 import Bnb4Encoding, Bnb4Source, Quantizer4, RoundTripSource
from lorastream.codecs.int8 import Int8Source
from lorastream.codecs.plain import BUFFER_SLACK
from lorastream.formats.hf import open_hf_model
from lorastream.formats.stored_rows import SourceRows

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
    assert info["quantized_weights"] == len(QUANTIZED_LINEARS)
    assert 3 * info["quantized_bytes_on_disk"] < info["quantized_bytes_dequantized"]
    job = lorastream.plan(tmp_path / "q", case.adapter, tmp_path / "out", max_memory=IN_PROCESS_BUDGET)
    q_proj = next(t for t in job.tensors if t.name == "model.layers.0.self_attn.q_proj.weight")
    assert isinstance(q_proj.source, Bnb4Source)
    assert q_proj.source.stored_bytes < q_proj.nbytes // 3  # packed on disk, dense in the output
    assert not any(".absmax" in t.name or "quant_state" in t.name for t in job.tensors)


def merged_fp32(case: Case) -> dict[str, torch.Tensor]:
    """The merged weights in float32: PEFT's merge on the base loaded in float32."""
    from peft import PeftModel

    model = case.model_class.from_pretrained(case.base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, case.adapter).merge_and_unload().state_dict()


QUANTIZED_LINEARS = [f"model.layers.{i}.{m}.weight" for i in range(2) for m in
                     ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                      "mlp.up_proj", "mlp.down_proj")]


@pytest.mark.parametrize(("quant_type", "double_quant"), [("nf4", True), ("nf4", False), ("fp4", True)])
def test_quantize_4bit_output_equals_bitsandbytes(case: Case, tmp_path: Path, quant_type: str,
                                                  double_quant: bool) -> None:
    lorastream.merge(case.base, case.adapter, tmp_path / "out", quantize=quant_type, double_quant=double_quant,
                     max_shard_size="300KB")
    ours = load_output(tmp_path / "out")
    reference = merged_fp32(case)
    for name in QUANTIZED_LINEARS:
        packed, state = bnb.functional.quantize_4bit(reference[name], blocksize=64, quant_type=quant_type,
                                                     compress_statistics=double_quant)
        assert torch.equal(ours[name], packed), name
        assert torch.equal(ours[f"{name}.absmax"], state.absmax), name
        assert torch.equal(ours[f"{name}.quant_map"], state.code), name
        quant_state = json.loads(bytes(ours[f"{name}.quant_state.bitsandbytes__{quant_type}"].tolist()))
        assert quant_state["shape"] == list(reference[name].shape)
        assert quant_state["dtype"] == "float32"  # what was quantized, as bitsandbytes records it
        if double_quant:
            assert torch.equal(ours[f"{name}.nested_absmax"], state.state2.absmax), name
            assert torch.equal(ours[f"{name}.nested_quant_map"], state.state2.code), name
            assert quant_state["nested_offset"] == state.offset.item()
    assert ours["lm_head.weight"].dtype == torch.bfloat16  # kept dense, as transformers does
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert config["bnb_4bit_quant_type"] == quant_type and config["bnb_4bit_use_double_quant"] == double_quant

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    layer = loaded.model.layers[1].mlp.down_proj
    assert isinstance(layer, bnb.nn.Linear4bit)
    packed, state = bnb.functional.quantize_4bit(reference["model.layers.1.mlp.down_proj.weight"], blocksize=64,
                                                 quant_type=quant_type, compress_statistics=double_quant)
    expected = bnb.functional.dequantize_4bit(packed, state)
    assert torch.equal(bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state), expected)
    with torch.no_grad():
        assert torch.isfinite(loaded(torch.tensor([[1, 2, 3]])).logits).all()


def test_quantize_int8_output_equals_bitsandbytes(case: Case, tmp_path: Path) -> None:
    lorastream.merge(case.base, case.adapter, tmp_path / "out", quantize="int8")
    ours = load_output(tmp_path / "out")
    reference = merged_fp32(case)
    for name in QUANTIZED_LINEARS:
        codes, scb, _ = bnb.functional.int8_vectorwise_quant(reference[name].to(torch.float16))
        module = name.removesuffix(".weight")
        assert torch.equal(ours[name], codes), name
        assert torch.equal(ours[f"{module}.SCB"], scb), name
        assert ours[f"{module}.weight_format"].item() == 0
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, bnb.nn.Linear8bitLt)
    assert torch.equal(loaded.model.layers[0].self_attn.q_proj.weight.data,
                       ours["model.layers.0.self_attn.q_proj.weight"])


def test_requantize_a_quantized_base(case: Case, tmp_path: Path) -> None:
    """NF4 in, NF4 out: the merge runs on bitsandbytes' dequantization and is quantized again."""
    model = quantize(case.base, tmp_path / "q", **FOUR_BIT["nf4-double"])
    lorastream.merge(tmp_path / "q", case.adapter, tmp_path / "out", quantize="nf4")
    ours = load_output(tmp_path / "out")
    from peft import PeftModel

    dense = dequantized_model(case, model, torch.bfloat16).float()
    reference = PeftModel.from_pretrained(dense, case.adapter).merge_and_unload().state_dict()
    name = "model.layers.0.self_attn.q_proj.weight"
    packed, state = bnb.functional.quantize_4bit(reference[name], blocksize=64, quant_type="nf4",
                                                 compress_statistics=True)
    assert torch.equal(ours[name], packed)
    assert torch.equal(ours[f"{name}.absmax"], state.absmax)


@pytest.mark.parametrize(("quant_type", "double_quant"), [("nf4", True), ("fp4", False)])
def test_trained_on_merges_into_what_qlora_saw(case: Case, tmp_path: Path, quant_type: str,
                                                double_quant: bool) -> None:
    """`--trained-on nf4` on a dense base equals PEFT's merge onto bitsandbytes' dequantize(quantize(W))."""
    model = quantize(case.base, tmp_path / "q", bnb_4bit_quant_type=quant_type,
                     bnb_4bit_use_double_quant=double_quant)
    lorastream.merge(case.base, case.adapter, tmp_path / "out", trained_on=quant_type, double_quant=double_quant)
    ours = load_output(tmp_path / "out")
    reference = peft_merge_on_dequantized(case, model, torch.bfloat16)
    dense = load_output(case.base)
    for name, tensor in ours.items():
        assert torch.equal(tensor, reference[name]), name
    name = "model.layers.0.self_attn.k_proj.weight"  # not adapted, yet rounded through the quantizer
    assert not torch.equal(ours[name], dense[name])
    assert torch.equal(ours["lm_head.weight"], dense["lm_head.weight"])  # kept dense in training too


def test_trained_on_refuses_a_quantized_base(case: Case, tmp_path: Path) -> None:
    quantize(case.base, tmp_path / "q", **FOUR_BIT["nf4-double"])
    with pytest.raises(lorastream.InputError, match="already quantized"):
        lorastream.merge(tmp_path / "q", case.adapter, tmp_path / "out", trained_on="nf4")
    assert not (tmp_path / "out").exists()


def test_quantized_output_logits_equal_peft_merge_quantized_the_same_way(case: Case, tmp_path: Path) -> None:
    """PEFT's merge (in float32) saved and loaded by transformers with the same BitsAndBytesConfig gives the
    same logits as lorastream's `--quantize nf4` output: both quantize the same float32 weights."""
    from peft import PeftModel

    lorastream.merge(case.base, case.adapter, tmp_path / "ours", quantize="nf4")
    model = case.model_class.from_pretrained(case.base, dtype=torch.float32)
    PeftModel.from_pretrained(model, case.adapter).merge_and_unload().save_pretrained(tmp_path / "peft")
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "peft", quantization_config=config,
                                                     dtype=torch.float32)
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32)
    for param in ours.parameters():  # transformers keeps a pre-quantized model's dense tensors in its config dtype
        if param.dtype == torch.bfloat16:
            param.data = param.data.float()
    tokens = torch.randint(0, 384, (2, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(ours(tokens).logits, reference(tokens).logits)


def test_double_quant_statistics_do_not_depend_on_the_engines_thread_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine runs torch with fewer threads than a default process; a 40960-block tensor's absmax mean is a
    parallel sum whose rounding changes with the thread count, so the offset must still be bitsandbytes' own
    (here: bitsandbytes in a process whose default is 2 threads)."""
    monkeypatch.setattr(bnb4, "DEFAULT_THREADS", 2)
    threads = torch.get_num_threads()
    plain_means_differ = 0
    try:
        for seed in range(6):
            weight = torch.randn(4096, 640, generator=torch.Generator().manual_seed(seed)) * 0.02
            _, absmax = Quantizer4("nf4", 64).quantize(weight, torch.empty(weight.numel() // 2, dtype=torch.uint8))
            torch.set_num_threads(2)
            reference = bnb.functional.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)[1]
            torch.set_num_threads(1)
            plain_means_differ += absmax.mean().item() != reference.offset.item()
            codes, nested_absmax, offset = bnb4.quantize_nested(absmax)
            assert offset == reference.offset.item()
            assert torch.equal(codes, reference.absmax) and torch.equal(nested_absmax, reference.state2.absmax)
    finally:
        torch.set_num_threads(threads)
    assert plain_means_differ, "no seed shows the thread-count effect; the test would pass without the fix"


def test_a_block_decodes_into_the_read_buffer_with_the_bits_of_a_fresh_decode(case: Case, tmp_path: Path) -> None:
    """Each kind of source decodes a block into the reader's buffer when it has `buffer_bytes_per_element`
    (fresh block-sized tensors are page faults that cost as much as the decode), and to the same bits into fresh
    memory when the buffer holds only the stored bytes."""
    quantize(case.base, tmp_path / "nf4", **FOUR_BIT["nf4-double"])
    quantize(case.base, tmp_path / "int8", load_in_8bit=True)
    name = "model.layers.0.self_attn.q_proj.weight"
    dense = open_hf_model(case.base).sources
    round_trips = [RoundTripSource(dense[n], Bnb4Encoding("nf4", True, torch.bfloat16))
                   for n in (name, name.replace("q_proj", "o_proj"))]
    sources = {"nf4": open_hf_model(tmp_path / "nf4").sources[name],
               "int8": open_hf_model(tmp_path / "int8").sources[name],
               "round trip": round_trips[0],
               "joined round trips": SourceRows("joined", ((round_trips[0], 64, 128), (round_trips[1], 0, 64)))}
    for kind, source in sources.items():
        roomy = bytearray(source.numel * source.buffer_bytes_per_element + BUFFER_SLACK)
        decoded = source.read_rows(0, source.rows, memoryview(roomy))
        start = torch.frombuffer(roomy, dtype=torch.uint8).data_ptr()
        assert start <= decoded.data_ptr() < start + len(roomy), kind
        fresh = source.read_rows(0, source.rows, memoryview(bytearray(source.stored_bytes)))
        assert torch.equal(decoded, fresh), kind
        assert source.buffer_bytes_per_element <= source.decode_bytes_per_element, kind  # the planner's bound
