"""The memory contract: a merge whose tensors exceed the budget runs in row blocks under `--max-memory`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import Case, build_case, load_output, peft_reference, tiny_llama

from lorastream.codecs import kernels

# The baseline (mostly `import torch`) varies with how much of libtorch the page cache holds (fault-around
# maps cached pages), 220-290 MiB here, so budgets are set relative to what `plan` measures.
WORKING_SPACE = 96 << 20


@pytest.fixture(scope="module")
def wide_case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    """A Llama whose lm_head (64000 x 1024 bf16, 125 MiB) is larger than the budget's working space."""
    model = tiny_llama(vocab_size=64000, hidden_size=1024, intermediate_size=256, num_hidden_layers=1,
                       num_attention_heads=8, num_key_value_heads=8)
    return build_case(tmp_path_factory.mktemp("wide"), model, torch.bfloat16, target_modules=["lm_head", "q_proj"],
                      r=16, lora_alpha=32)


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lorastream", *map(str, args)], capture_output=True, text=True,
                          check=False)


def budget_for(case: Case, tmp_path: Path, *extra: str) -> int:
    """A budget leaving WORKING_SPACE above the baseline `plan` measures."""
    planned = json.loads(run_cli("plan", case.base, case.adapter, "-o", tmp_path / "out", "--max-memory", "4GiB",
                                 "--json", *extra).stdout)
    return planned["baseline_rss"] + WORKING_SPACE


def test_peak_rss_stays_within_budget(wide_case: Case, tmp_path: Path) -> None:
    budget = budget_for(wide_case, tmp_path)
    lm_head_bytes = 64000 * 1024 * 2
    assert lm_head_bytes > WORKING_SPACE, "the test needs a tensor larger than the working budget"

    done = run_cli("merge", wide_case.base, wide_case.adapter, "-o", tmp_path / "out", "--max-memory", str(budget),
                   "--json", "--quiet")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["peak_rss"] <= budget
    assert "Memory used: peak RSS" in done.stderr

    ours = load_output(tmp_path / "out")
    reference = peft_reference(wide_case)[1]
    assert torch.equal(ours["lm_head.weight"], reference["lm_head.weight"])
    assert torch.equal(ours["model.layers.0.self_attn.q_proj.weight"],
                       reference["model.layers.0.self_attn.q_proj.weight"])


def test_budget_below_minimum_is_refused_with_the_fitting_option(wide_case: Case, tmp_path: Path) -> None:
    planned = json.loads(run_cli("plan", wide_case.base, wide_case.adapter, "-o", tmp_path / "out",
                                 "--max-memory", "4GiB", "--json").stdout)
    too_small = planned["minimum_budget"] - (8 << 20)
    done = run_cli("merge", wide_case.base, wide_case.adapter, "-o", tmp_path / "out", "--max-memory", str(too_small))
    assert done.returncode == 3
    assert "--max-memory" in done.stderr and "MiB or more" in done.stderr
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_quantized_output_and_qlora_round_trip_stay_within_budget(wide_case: Case, tmp_path: Path) -> None:
    options = ("--quantize", "nf4", "--trained-on", "nf4")
    # the plan reserves room for the compiled codec kernels, loaded after the baseline is measured
    budget = budget_for(wide_case, tmp_path, *options) + kernels.LOAD_BYTES
    done = run_cli("merge", wide_case.base, wide_case.adapter, "-o", tmp_path / "out", "--max-memory", str(budget),
                   *options, "--json", "--quiet")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["peak_rss"] <= budget
    ours = load_output(tmp_path / "out")
    assert ours["model.layers.0.self_attn.q_proj.weight"].dtype == torch.uint8
    assert ours["lm_head.weight"].dtype == torch.bfloat16


def test_quantizing_keeps_transformers_out_of_the_merge_process(wide_case: Case, tmp_path: Path) -> None:
    """Which tensors bitsandbytes quantizes comes from transformers' model class, read in a child process: its
    modules (about 130 MiB) would otherwise count in the merge's baseline for the whole job."""
    planned = [json.loads(run_cli("plan", wide_case.base, wide_case.adapter, "-o", tmp_path / "out", "--max-memory",
                                  "4GiB", "--json", *options).stdout)["baseline_rss"]
               for options in ((), ("--quantize", "nf4"), ("--trained-on", "nf4"))]
    assert max(planned) - min(planned) < 48 << 20, [p >> 20 for p in planned]


def test_each_adapter_output_stays_within_budget(wide_case: Case, tmp_path: Path) -> None:
    """`--each`: three outputs, their adapter tensors and output blocks all within one budget."""
    budget = budget_for(wide_case, tmp_path)
    adapters = [tmp_path / name for name in ("one", "two", "three")]
    for adapter in adapters:
        shutil.copytree(wide_case.adapter, adapter)
    done = run_cli("merge", wide_case.base, "--each", *adapters, "-o", tmp_path / "out", "--max-memory", str(budget),
                   "--json", "--quiet")
    assert done.returncode == 0, done.stderr
    summaries = json.loads(done.stdout)
    assert [s["out_dir"] for s in summaries] == [str(tmp_path / "out" / a.name) for a in adapters]
    assert summaries[0]["peak_rss"] <= budget
    reference = peft_reference(wide_case)[1]
    for adapter in adapters:
        assert torch.equal(load_output(tmp_path / "out" / adapter.name)["lm_head.weight"], reference["lm_head.weight"])


def test_a_fused_experts_tensor_larger_than_the_budget_is_merged_in_row_blocks(tmp_path: Path) -> None:
    """gpt-oss keeps its experts fused on disk: `gate_up_proj` [16 experts, 512, 8192] bf16 is 128 MiB, more than
    the working space; PEFT's ParamWrapper update is applied to it block by block, expert slice by slice."""
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(0)
    model = GptOssForCausalLM(GptOssConfig(vocab_size=256, hidden_size=512, intermediate_size=4096, num_hidden_layers=1,
                                           num_attention_heads=8, num_key_value_heads=8, head_dim=64,
                                           num_local_experts=16, num_experts_per_tok=2))
    case = build_case(tmp_path / "case", model, torch.bfloat16, target_modules=["q_proj"], r=4, lora_alpha=8,
                      target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    fused = "model.layers.0.mlp.experts.gate_up_proj"
    assert WORKING_SPACE < 16 * 512 * 8192 * 2, "the test needs a fused tensor larger than the working budget"
    budget = budget_for(case, tmp_path)
    done = run_cli("merge", case.base, case.adapter, "-o", tmp_path / "out", "--max-memory", str(budget), "--json",
                   "--quiet")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["peak_rss"] <= budget
    reference = peft_reference(case)[1]
    ours = load_output(tmp_path / "out")
    assert torch.equal(ours[fused], reference[fused])
    assert not torch.equal(ours[fused], load_output(case.base)[fused])
