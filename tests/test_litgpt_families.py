"""`lorastream merge RUN --format hf` for every family litgpt's `convert_lit_checkpoint` converts.

For each family, a tiny model from litgpt's own config of that name (`Config.from_name` with small sizes), a LoRA
run on every module litgpt can adapt, merged by `litgpt merge_lora` and converted by litgpt's converter (see
litgpt_reference.py): lorastream's Hugging Face folder holds the same tensors bit for bit, in row blocks of the
smallest size, and transformers loads it with `from_pretrained` into a model whose logits are LitGPT's (float32
cases; tolerance as in test_litgpt.py). Where lorastream deliberately differs from litgpt's converter (a LoRA on
lm_head of a tied family, Phi-4-reasoning's untied lm_head, Gemma-2b's norm names, OLMo-2, on which litgpt
0.5.13's converter fails) the test says how, and checks it. Every model litgpt names maps to a family.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import load_output
from test_litgpt import ALL, LITGPT_PYTHON, NONE, assert_identical, run_litgpt_script

from lorastream import api
from lorastream.cli import main
from lorastream.errors import InputError

TINY = dict(n_layer=2, n_embd=64, n_head=4, head_size=16, n_query_groups=2, intermediate_size=96, vocab_size=256,
            padded_vocab_size=256, block_size=64)
HEADLESS = {**ALL, "lora_head": False}


def _case(name: str, *, lora: dict | None = None, dtype: str = "float32", tied: bool = False,
          **overrides: object) -> dict:
    """`tied`: a family Hugging Face ties lm_head to the embedding (LitGPT's copy of it is then equal to it)."""
    return dict(name=name, config={**TINY, **overrides}, lora=dict(lora_r=4, lora_alpha=8, **(lora or ALL)),
                base_dtype=dtype, lora_dtype=dtype, hf=True, logits=dtype == "float32", tied=tied)


SLIDING = dict(sliding_window_size=4, sliding_window_indices=[1, 0])
MOE = dict(n_expert=4, n_expert_per_token=2, moe_intermediate_size=32)
FAMILIES = {
    "llama3": _case("Llama-3.2-1B"),
    "llama2_32k": _case("LLaMA-2-7B-32K"),
    "mathstral": _case("Mathstral-7B-v0.1", sliding_window_size=4, sliding_window_indices=[1, 1]),
    "olmo": _case("OLMo-1B-hf"),
    "stablelm": _case("stablelm-3b-4e1t"),
    "mistral": _case("Mistral-7B-v0.1", sliding_window_size=4, sliding_window_indices=[1, 1]),
    "mixtral": _case("Mixtral-8x7B-v0.1", **MOE),
    "mixtral_bf16": _case("Mixtral-8x7B-v0.1", dtype="bfloat16", **MOE),
    "qwen2.5": _case("Qwen2.5-0.5B"),
    "qwen3": _case("Qwen3-0.6B", head_size=32),
    "qwen3_moe": _case("Qwen3-30B-A3B", head_size=32, **MOE),
    "gemma": _case("Gemma-7b", lora=HEADLESS, tied=True, head_size=32),
    "gemma_2b": _case("Gemma-2b", lora=HEADLESS, tied=True, n_query_groups=1),
    "gemma2": _case("Gemma-2-2b", lora=HEADLESS, tied=True, head_size=32, **SLIDING),
    "gemma2_head": _case("Gemma-2-2b", tied=True, **SLIDING),
    "gemma3": _case("Gemma-3-4b-it", lora=HEADLESS, tied=True, head_size=32, rope_indices=[1, 0], **SLIDING),
    "phi2": _case("phi-2", n_query_groups=4),
    "phi3": _case("Phi-3-mini-4k-instruct", n_query_groups=4, sliding_window_size=4, sliding_window_indices=[1, 1]),
    "phi3_bf16": _case("Phi-3-mini-4k-instruct", dtype="bfloat16", n_query_groups=4),
    "phi4_mini": _case("Phi-4-mini-instruct", lora=HEADLESS, tied=True),
    "phi4_reasoning": _case("Phi-4-reasoning", lora=HEADLESS),
    "olmo2": _case("OLMo-2-1124-7B", n_query_groups=4),
    "falcon7b": _case("falcon-7b", n_query_groups=1),
    "falcon40b": _case("falcon-40b"),
    "falcon3": _case("Falcon3-1B-Base", dtype="bfloat16", head_size=32),
}
# litgpt's converter drops lm_head for these; lorastream keeps it (and unties it): a LoRA on it was merged, or
# (Phi-4-reasoning, a 14B Phi-4) the Hugging Face model does not tie it
KEEPS_HEAD = {"gemma2_head", "phi4_reasoning"}
# gate_up_proj (2 x 24576 rows x 1024, bf16: 96 MiB) larger than the working memory the budget below leaves
WIDE = {"phi3_wide": _case("Phi-3-mini-4k-instruct", dtype="bfloat16", lora=dict(NONE, lora_mlp=True), n_layer=1,
                           n_embd=1024, n_head=8, n_query_groups=8, head_size=128, intermediate_size=24576)}
# a Mixtral with a shared expert (as DeepSeek-MoE has), which LitGPT builds and no exported family computes
REFUSED = {"shared_expert": {**_case("Mixtral-8x7B-v0.1", lora=dict(NONE, lora_query=True), n_shared_expert=1, **MOE),
                             "hf": False, "logits": False}}
pytestmark = pytest.mark.usefixtures("smallest_blocks")


@pytest.fixture(scope="module")
def family_cases(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every family's case built, merged and converted by litgpt."""
    return run_litgpt_script(tmp_path_factory.mktemp("families"), Path(__file__).with_name("litgpt_reference.py"),
                             {**FAMILIES, **WIDE, **REFUSED})


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_export_equals_litgpt_converter_and_loads_in_transformers(family_cases: Path, tmp_path: Path,
                                                                  family: str) -> None:
    from transformers import AutoModelForCausalLM

    case = family_cases / family
    out = tmp_path / "hf"
    done = CliRunner().invoke(main, ["merge", str(case / "run"), "-o", str(out), "--format", "hf", "-q"])
    assert done.exit_code == 0, done.output
    ours = load_output(out)
    merged = torch.load(case / "reference" / "lit_model.pth", weights_only=True)  # litgpt merge_lora's
    if family == "olmo2":
        assert_identical(_olmo2_back_to_litgpt(case, out, tmp_path), merged)
    else:
        reference = _reference(case)
        if family == "gemma_2b":  # the converter takes "Gemma-2b" for a Gemma 2 and names norm_2 as Gemma 2 does
            reference = {name.replace("pre_feedforward_layernorm", "post_attention_layernorm"): tensor
                         for name, tensor in reference.items()}
        if family in KEEPS_HEAD:
            assert "lm_head.weight" not in reference
            reference["lm_head.weight"] = merged["lm_head.weight"]
        assert_identical(ours, reference)
    assert api.verify_litgpt(case / "run", out).ok
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] == ("lm_head.weight" not in ours)
    model, loading = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(model).__name__ == config["architectures"][0]
    assert not any(loading.values()), loading  # no tensor missing, unexpected or mismatched
    assert model.dtype == next(iter(ours.values())).dtype
    if FAMILIES[family]["logits"]:
        expected = torch.load(case / "logits.pt", weights_only=True)
        with torch.no_grad():
            got = model(expected["tokens"]).logits
        torch.testing.assert_close(got, expected["logits"], rtol=0, atol=1e-4)


def _reference(case: Path) -> dict[str, torch.Tensor]:
    error = case / "reference_hf" / "error.txt"
    assert not error.exists(), error.read_text()
    return torch.load(case / "reference_hf" / "model.pth", weights_only=True)


def _olmo2_back_to_litgpt(case: Path, out: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    """litgpt 0.5.13's converter fails on OLMo-2 (it has no name for `post_attention_norm`), so the export is
    checked the other way: litgpt's own Hugging Face -> LitGPT conversion of it gives back merge_lora's tensors."""
    error = (case / "reference_hf" / "error.txt").read_text()
    assert "post_attention_norm" in error, error  # once litgpt's converter works, compare with its output instead
    script = ("import sys, torch; from pathlib import Path; from litgpt import Config; "
              "from litgpt.scripts.convert_hf_checkpoint import copy_weights_olmo2, load_safetensors\n"
              "state, config = {}, Config.from_file(Path(sys.argv[1]))\n"
              "copy_weights_olmo2(config, {}, state, load_safetensors(Path(sys.argv[2])))\n"
              "torch.save(state, sys.argv[3])")
    back = tmp_path / "back.pth"
    done = subprocess.run([str(LITGPT_PYTHON), "-c", script, str(case / "base" / "model_config.yaml"),
                           str(out / "model.safetensors"), str(back)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(back, weights_only=True)


def test_unsupported_model_is_refused_in_one_line(family_cases: Path, tmp_path: Path) -> None:
    """A Mixtral with a shared expert: no exported class computes it, so lorastream refuses before writing anything,
    naming the model and the setting; `inspect` says it has no Hugging Face architecture."""
    out = tmp_path / "hf"
    run = family_cases / "shared_expert" / "run"
    done = CliRunner().invoke(main, ["merge", str(run), "-o", str(out), "--format", "hf"])
    assert done.exit_code == 2, done.output
    assert len(done.output.strip().splitlines()) == 1, done.output
    assert "'Mixtral-8x7B-v0.1'" in done.output and "n_shared_expert is 1" in done.output, done.output
    assert "Traceback" not in done.output and not out.exists()
    assert api.inspect(run)["hf_architecture"] is None


def test_every_model_litgpt_names_has_a_family(tmp_path: Path) -> None:
    """Each of litgpt's named configs (as `model_config.yaml` holds them) is exported by a family, and every
    family is some named model's."""
    from lorastream.litgpt_families import FAMILIES, family_of

    script = ("import dataclasses, json, sys; from litgpt.config import configs, Config\n"
              "json.dump({c['name']: dataclasses.asdict(Config.from_name(c['name'])) for c in configs}, "
              "open(sys.argv[1], 'w'), default=str)")
    dumped = tmp_path / "configs.json"
    done = subprocess.run([str(LITGPT_PYTHON), "-c", script, str(dumped)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    configs = json.loads(dumped.read_text())
    refused: dict[str, str] = {}
    found: set[int] = set()
    for name, config in configs.items():
        try:
            found.add(id(family_of(config, name)))
        except InputError as exc:
            refused[name] = str(exc)
    assert len(configs) > 200 and not refused, refused
    assert found == {id(family) for family in FAMILIES.values()}


def test_a_stacked_tensor_lora_is_not_converted_to_peft(family_cases: Path) -> None:
    """Phi-3's fc_1 LoRA covers half of Hugging Face's gate_up_proj: as a PEFT LoRA it would have the wrong shape,
    so converting the adapter is refused (merging it, above, is not)."""
    from lorastream.extract import AdapterTensor, litgpt_as_peft
    from lorastream.formats.litgpt import read_yaml

    run = family_cases / "phi3" / "run"
    lora = torch.load(run / "lit_model.pth.lora", weights_only=True)["model"]
    tensors = [AdapterTensor(name, t.dtype, tuple(t.shape), lambda t=t: t) for name, t in lora.items()
               if ".mlp.fc_1." in name]
    with pytest.raises(InputError, match="stacked gate_up_proj"):
        litgpt_as_peft(tensors, read_yaml(run / "hyperparameters.yaml"), read_yaml(run / "model_config.yaml"),
                       str(run))


def test_a_stacked_tensor_streams_within_the_memory_budget(family_cases: Path, tmp_path: Path) -> None:
    """Phi-3's gate_up_proj, stacked from fc_1 and fc_2 and larger than the working memory the budget leaves above
    the interpreter, is merged in row blocks: peak RSS stays within the budget, the bits are the converter's."""
    probe = subprocess.run([sys.executable, "-c", "import lorastream.cli, psutil; "
                            "print(psutil.Process().memory_info().rss)"], capture_output=True, text=True, check=True)
    working = 72 << 20
    budget = int(probe.stdout) + working
    case = family_cases / "phi3_wide"
    out = tmp_path / "hf"
    done = subprocess.run([sys.executable, "-m", "lorastream", "merge", str(case / "run"), "-o", str(out), "--format",
                           "hf", "--max-memory", str(budget), "--json", "-q"], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["peak_rss"] <= budget
    ours = load_output(out)
    assert ours["model.layers.0.mlp.gate_up_proj.weight"].numel() * 2 > working
    assert_identical(ours, _reference(case))
