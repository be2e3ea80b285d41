"""`extract` and `save_lora`: the adapter alone, out of a whole checkpoint or a live model, equal to what the
libraries save themselves (PEFT's `save_pretrained`, LitGPT's `finetune lora` + `lora_filter`) and loaded or
merged by them (`PeftModel.from_pretrained`, `litgpt merge_lora`) into the same model, bit for bit."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from test_litgpt import LLAMA, assert_identical, run_litgpt_script

import lorastream
from lorastream.cli import main
from lorastream.codecs.plain import TensorRef
from lorastream.errors import InputError
from lorastream.formats.litgpt import read_yaml

SCRIPT = Path(__file__).with_name("litgpt_adapter_reference.py")
ALL = dict(lora_query=True, lora_key=True, lora_value=True, lora_projection=True, lora_mlp=True, lora_head=True)
LITGPT_CASES = {
    # q, k and v all adapted: which parts the fused qkv LoRA covers is clear from its shapes alone
    "all_bf16": dict(config=LLAMA, lora=dict(lora_r=4, lora_alpha=8, **ALL), dtype="bfloat16",
                     extract=dict(lora_alpha=8, base="base")),
    # q and v of a grouped-query model: k and v have the same size, so only hyperparameters.yaml can tell
    "qv_fp32": dict(config=LLAMA, lora=dict(lora_r=8, lora_alpha=16, **{**ALL, "lora_key": False,
                                                                       "lora_projection": False}),
                    dtype="float32", hyperparameters_beside=True, extract={}, hf=True),
}


@pytest.fixture(scope="module")
def litgpt_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Each case built by litgpt, its adapter extracted and saved by lorastream, all merged by litgpt: one run of
    litgpt's interpreter (importing litgpt takes seconds)."""
    return run_litgpt_script(tmp_path_factory.mktemp("litgpt_extract"), SCRIPT, LITGPT_CASES)


def load_lora(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "lit_model.pth.lora", weights_only=True)["model"]


@pytest.mark.parametrize("case", list(LITGPT_CASES))
@pytest.mark.parametrize("made_by", ["extracted", "saved"])
def test_litgpt_adapter_merges_as_litgpt_own_run(litgpt_runs: Path, case: str, made_by: str) -> None:
    folder = litgpt_runs / case / made_by
    reference = litgpt_runs / case / "reference"
    assert_identical(load_lora(folder), load_lora(reference))
    assert_identical(torch.load(folder / "lit_model.pth", weights_only=True),
                     torch.load(reference / "lit_model.pth", weights_only=True))
    ours, theirs = (read_yaml(f / "hyperparameters.yaml") for f in (folder, reference))
    assert {k: v for k, v in ours.items() if k.startswith("lora_") and k != "lora_dropout"} == {
        k: v for k, v in theirs.items() if k.startswith("lora_") and k != "lora_dropout"}


def test_litgpt_what_the_tensors_cannot_tell_is_asked_for(litgpt_runs: Path, tmp_path: Path) -> None:
    alone = tmp_path / "lit_model.pth"  # the q+v checkpoint without its hyperparameters.yaml
    shutil.copy(litgpt_runs / "qv_fp32" / "whole" / "lit_model.pth", alone)
    base = litgpt_runs / "qv_fp32" / "base"
    with pytest.raises(InputError, match=r"lora_alpha .* pass --lora-alpha"):
        lorastream.extract(litgpt_runs / "all_bf16" / "whole" / "lit_model.pth", tmp_path / "a", base=base)
    with pytest.raises(InputError, match=r"model_config.yaml .* pass --base"):
        lorastream.extract(alone, tmp_path / "b", lora_alpha=16)
    with pytest.raises(InputError, match=r"cannot tell which of q, k, v .* lora_query, lora_key, lora_value"):
        lorastream.extract(alone, tmp_path / "c", lora_alpha=16, base=base)
    assert not any(tmp_path.glob("[abc]*"))


def test_litgpt_adapter_as_peft_on_the_converted_model(litgpt_runs: Path, tmp_path: Path) -> None:
    """Converted to PEFT form, the adapter merged by PEFT into the base as litgpt converts it to Hugging Face form
    gives the model LitGPT merged and converted (float32, so both libraries merge in the same precision)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    case = litgpt_runs / "qv_fp32"
    lorastream.extract(case / "whole" / "lit_model.pth", tmp_path / "peft", format="peft")
    model = LlamaForCausalLM(LlamaConfig(vocab_size=384, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                         tie_word_embeddings=False))
    model.load_state_dict(torch.load(case / "base_hf" / "model.pth", weights_only=True))
    merged = PeftModel.from_pretrained(model, tmp_path / "peft").merge_and_unload().state_dict()
    assert_identical(merged, torch.load(case / "reference_hf" / "model.pth", weights_only=True))


def test_a_checkpoint_without_lora_is_refused(litgpt_runs: Path, tmp_path: Path) -> None:
    base = litgpt_runs / "all_bf16" / "base" / "lit_model.pth"
    done = CliRunner().invoke(main, ["extract", str(base), "-o", str(tmp_path / "out")])
    assert done.exit_code == 2, done.output
    assert done.output.count("\n") == 1 and "no LoRA tensors" in done.output and "Traceback" not in done.output
    assert not (tmp_path / "out").exists()


def peft_model(**lora: object) -> torch.nn.Module:
    """A PeftModel on a tiny Llama with trained (random) adapter weights."""
    model = get_peft_model(tiny_llama(), LoraConfig(init_lora_weights=False, **lora))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator).to(param.dtype) * 0.05)
    return model


TOKENS = torch.randint(0, 384, (2, 10), generator=torch.Generator().manual_seed(3))
PEFT_CASES = {
    "dora_modules_to_save": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True,
                                 modules_to_save=["lm_head"], rank_pattern={"down_proj": 2}),
    "embedding": dict(r=8, lora_alpha=4, target_modules=["embed_tokens", "k_proj", "o_proj"]),
}


def assert_same_adapter(ours: Path, theirs: Path) -> None:
    assert_identical(load_file(ours / "adapter_model.safetensors"), load_file(theirs / "adapter_model.safetensors"))


def assert_loads_as_the_model(folder: Path, model: torch.nn.Module, reference: Path) -> None:
    """PEFT loads the adapter onto a fresh base: the same logits as the original, the same merged weights."""
    loaded = PeftModel.from_pretrained(tiny_llama(), folder)
    with torch.no_grad():
        assert torch.equal(loaded(TOKENS).logits, model(TOKENS).logits)
    merged = PeftModel.from_pretrained(tiny_llama(), reference).merge_and_unload().state_dict()
    assert_identical(loaded.merge_and_unload().state_dict(), merged)


@pytest.mark.parametrize("case", list(PEFT_CASES))
@pytest.mark.parametrize("saved_as", ["whole.pth", "whole.safetensors"])
def test_peft_whole_model_extracts_to_its_adapter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str,
                                                  saved_as: str) -> None:
    read: list[str] = []
    original = TensorRef.read
    monkeypatch.setattr(TensorRef, "read", lambda self: read.append(self.name) or original(self))
    model = peft_model(**PEFT_CASES[case])
    model.save_pretrained(tmp_path / "reference")
    state = model.state_dict()
    torch.save(state, tmp_path / "whole.pth") if saved_as.endswith(".pth") else save_file(state,
                                                                                         tmp_path / "whole.safetensors")
    alpha = str(PEFT_CASES[case]["lora_alpha"])
    done = CliRunner().invoke(main, ["extract", str(tmp_path / saved_as), "-o", str(tmp_path / "out"),
                                     "--lora-alpha", alpha, "--json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["format"] == "peft"
    assert_same_adapter(tmp_path / "out", tmp_path / "reference")
    # only the adapter's tensors were read (and the embedding's base weight, which PEFT saves with its LoRA)
    assert read and all(re.search(r"lora_|modules_to_save|embed_tokens\.base_layer", name) for name in read)
    assert_loads_as_the_model(tmp_path / "out", model, tmp_path / "reference")


def test_peft_config_beside_the_checkpoint_is_used(tmp_path: Path) -> None:
    model = peft_model(r=4, lora_alpha=32, use_rslora=True, target_modules=["q_proj", "up_proj"])
    model.save_pretrained(tmp_path / "reference")
    (tmp_path / "run").mkdir()
    torch.save(model.state_dict(), tmp_path / "run" / "model.pth")
    shutil.copy(tmp_path / "reference" / "adapter_config.json", tmp_path / "run")
    lorastream.extract(tmp_path / "run" / "model.pth", tmp_path / "out")
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["use_rslora"] is True
    assert_loads_as_the_model(tmp_path / "out", model, tmp_path / "reference")
    with pytest.raises(InputError, match="no adapter named 'other'; it holds default"):
        lorastream.extract(tmp_path / "run" / "model.pth", tmp_path / "other", adapter_name="other")


def test_save_lora_of_a_peft_model_equals_save_pretrained(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = peft_model(**PEFT_CASES["dora_modules_to_save"])
    model.save_pretrained(tmp_path / "reference")
    with caplog.at_level("INFO", logger="lorastream"):
        result = lorastream.save_lora(model, tmp_path / "out")
    assert result.format == "peft" and result.bytes_written == (tmp_path / "out" / "adapter_model.safetensors").stat(
    ).st_size
    assert "extra memory" in caplog.text
    assert_same_adapter(tmp_path / "out", tmp_path / "reference")
    assert_loads_as_the_model(tmp_path / "out", model, tmp_path / "reference")


def test_save_lora_leaves_a_4bit_base_untouched(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_llama().save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16), dtype=torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "gate_proj"],
                                            init_lora_weights=False))
    quantized = {n: (p, p.data_ptr(), p.clone()) for n, p in model.named_parameters()
                 if isinstance(p, bnb.nn.Params4bit)}
    assert quantized
    model.save_pretrained(tmp_path / "reference")
    lorastream.save_lora(model, tmp_path / "out")
    assert_same_adapter(tmp_path / "out", tmp_path / "reference")
    for name, param in model.named_parameters():
        if name in quantized:
            same, pointer, before = quantized[name]
            assert param is same and isinstance(param, bnb.nn.Params4bit) and param.data_ptr() == pointer
            assert param.dtype == torch.uint8 and torch.equal(param, before)
