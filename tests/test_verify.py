"""`verify` recomputes a merge and catches outputs whose adapter was applied twice or not at all."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import Case, build_case, tiny_llama

import lorastream


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    return build_case(tmp_path_factory.mktemp("verify"), tiny_llama(hidden_size=128, intermediate_size=256),
                      torch.bfloat16, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"], r=4,
                      lora_alpha=8)


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lorastream", *map(str, args)], capture_output=True, text=True,
                          check=False)


def test_merge_then_verify_passes(case: Case, tmp_path: Path) -> None:
    done = run("merge", case.base, case.adapter, "-o", tmp_path / "out", "--verify", "--max-memory", "1GiB")
    assert done.returncode == 0, done.stderr
    assert "verified" in done.stderr
    checked = run("verify", case.base, case.adapter, tmp_path / "out", "--json")
    assert checked.returncode == 0, checked.stdout
    report = json.loads(checked.stdout)
    assert report["ok"] and all(t["ok"] for t in report["tensors"])
    assert {t["name"] for t in report["tensors"]} >= {"model.layers.0.self_attn.q_proj.weight", "lm_head.weight"}


def test_adapter_applied_twice_or_not_at_all_is_caught(case: Case, tmp_path: Path) -> None:
    lorastream.merge(case.base, case.adapter, tmp_path / "once")
    lorastream.merge(tmp_path / "once", case.adapter, tmp_path / "twice")
    twice = run("verify", case.base, case.adapter, tmp_path / "twice", "--json")
    assert twice.returncode == 4
    bad = {t["name"] for t in json.loads(twice.stdout)["tensors"] if not t["ok"]}
    assert "model.layers.1.mlp.down_proj.weight" in bad and "model.layers.0.self_attn.q_proj.weight" in bad
    assert "model.layers.0.self_attn.k_proj.weight" not in bad
    # PEFT saved the base embedding with the adapter; it replaces the input's, so the second merge starts from
    # the original embedding again and its result is right
    assert "model.embed_tokens.weight" not in bad
    never = run("verify", case.base, case.adapter, case.base)
    assert never.returncode == 4
    assert "MISMATCH" in never.stdout


def test_peft_output_verifies(case: Case, tmp_path: Path) -> None:
    """PEFT's own merged model passes (its embedding rounding differs by at most one step)."""
    from peft import PeftModel

    model = case.model_class.from_pretrained(case.base, dtype=torch.bfloat16)
    PeftModel.from_pretrained(model, case.adapter).merge_and_unload().save_pretrained(tmp_path / "peft")
    report = lorastream.verify(case.base, case.adapter, tmp_path / "peft")
    assert report.ok, [c.to_json() for c in report.checks if not c.ok]


def test_quantized_output_verifies_from_its_record(case: Case, tmp_path: Path) -> None:
    lorastream.merge(case.base, case.adapter, tmp_path / "nf4", quantize="nf4")
    report = lorastream.verify(case.base, case.adapter, tmp_path / "nf4")  # options from lorastream.json
    assert report.ok
    assert any(c.name.endswith(".absmax") for c in report.checks)
