"""`merge --each`: many adapters, one pass over the base, one output per adapter identical to its own merge."""

from __future__ import annotations

import filecmp
import json
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import IN_PROCESS_BUDGET, build_case, tiny_gpt2, tiny_llama

from lorastream import api
from lorastream.codecs.plain import TensorRef
from lorastream.errors import InputError
from lorastream.io.staging import MANIFEST

# Different ranks and targets; all three change q_proj, so a per-output read would read it three times.
ADAPTERS: dict[str, dict[str, Any]] = {
    "alpha": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "beta": {"r": 8, "lora_alpha": 8, "target_modules": ["q_proj", "down_proj", "lm_head"], "use_rslora": True},
    "gamma": {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "o_proj"], "use_dora": True,
              "modules_to_save": ["embed_tokens"]},
}


@pytest.fixture(scope="module")
def three(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """A tiny Llama base and three PEFT adapters for it, in folders named after the adapters."""
    root = tmp_path_factory.mktemp("each")
    adapters = []
    for name, lora in ADAPTERS.items():
        case = build_case(root / f"build-{name}", tiny_llama(), torch.bfloat16, **lora)
        adapters.append(case.adapter.rename(root / name))
    return case.base, adapters


def _merge_alone_and_each(three: tuple[Path, list[Path]], tmp_path: Path, **options: Any) -> list[tuple[Path, Path]]:
    base, adapters = three
    results = api.merge_each(base, adapters, tmp_path / "each", max_memory=IN_PROCESS_BUDGET, **options)
    assert [r.out_dir for r in results] == [tmp_path / "each" / a.name for a in adapters]
    pairs = []
    for adapter in adapters:
        alone = api.merge(base, adapter, tmp_path / "alone" / adapter.name, max_memory=IN_PROCESS_BUDGET,
                          **options).out_dir
        pairs.append((alone, tmp_path / "each" / adapter.name))
    return pairs


@pytest.mark.parametrize("options", [{}, {"dtype": "float16", "quantize": "nf4", "trained_on": "nf4"}],
                         ids=["plain", "fp16-nf4-qlora"])
def test_each_output_is_byte_identical_to_merging_its_adapter_alone(
        three: tuple[Path, list[Path]], tmp_path: Path, smallest_blocks: None, options: dict[str, Any]) -> None:
    for alone, each in _merge_alone_and_each(three, tmp_path, **options):
        names = sorted(p.name for p in alone.iterdir())
        assert names == sorted(p.name for p in each.iterdir())
        _, mismatch, errors = filecmp.cmpfiles(alone, each, names, shallow=False)
        assert (mismatch, errors) == ([], []), f"{each.name}: files differ from the merge alone"


def test_base_rows_are_read_once_for_all_outputs(three: tuple[Path, list[Path]], tmp_path: Path,
                                                 smallest_blocks: None, monkeypatch: pytest.MonkeyPatch) -> None:
    base, adapters = three
    reads: Counter[tuple[str, int, int]] = Counter()
    read = TensorRef.read_elements_into

    def counting(self: TensorRef, first: int, count: int, buffer: memoryview) -> torch.Tensor:
        if self.path.parent == base:
            reads[(self.name, first, count)] += 1
        return read(self, first, count, buffer)

    monkeypatch.setattr(TensorRef, "read_elements_into", counting)
    api.merge_each(base, adapters, tmp_path / "out", max_memory=IN_PROCESS_BUDGET)
    read_tensors = {name for name, _, _ in reads}
    assert len(reads) > len(read_tensors), "expected a tensor read in several row blocks"
    assert max(reads.values()) == 1, f"base rows read more than once: {[k for k, n in reads.items() if n > 1]}"
    computed = {t.name for job in api.plan_each(base, adapters, tmp_path / "x") for t in job.tensors if not t.is_copy
                and t.origin == "base"}
    assert "model.layers.0.self_attn.q_proj.weight" in computed  # changed by all three adapters
    assert read_tensors == computed  # every computed base tensor read, unchanged ones copied in the kernel


def test_duplicate_adapter_folder_names_are_refused(three: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base, adapters = three
    twin = tmp_path / "elsewhere" / adapters[0].name
    shutil.copytree(adapters[0], twin)
    with pytest.raises(InputError, match="share the folder name 'alpha'"):
        api.merge_each(base, [adapters[0], twin], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_each_writes_one_folder_per_adapter_and_refuses_weights(three: tuple[Path, list[Path]],
                                                                    tmp_path: Path) -> None:
    base, adapters = three
    cli = [sys.executable, "-m", "lorastream", "merge", str(base), "--each", *map(str, adapters[:2]),
           "-o", str(tmp_path / "out")]
    refused = subprocess.run([*cli, "--weights", "1,1"], capture_output=True, text=True, check=False)
    assert refused.returncode == 2 and "--weights" in refused.stderr and "--each" in refused.stderr
    done = subprocess.run([*cli, "--quiet", "--max-memory", "4GiB"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["alpha", "beta"]
    assert done.stderr.count("wrote ") == 2
    planned = subprocess.run([sys.executable, "-m", "lorastream", "plan", str(base), "--each", *map(str, adapters),
                              "-o", str(tmp_path / "next"), "--json"], capture_output=True, text=True, check=False)
    assert planned.returncode == 0, planned.stderr
    plans = json.loads(planned.stdout)
    assert [p["buffers"]["4 output blocks (written behind)"] for p in plans] == [8, 8, 8]  # bf16, one per output + 1
    assert len({p["minimum_budget"] for p in plans}) == 1  # one budget for the pass


def test_interrupted_each_resumes_every_output_from_its_own_staging(three: tuple[Path, list[Path]],
                                                                     tmp_path: Path) -> None:
    base, adapters = three
    options: dict[str, Any] = {"max_memory": "4GiB", "max_shard_size": "100KB"}
    written = 0

    def interrupt_midway(n: int) -> None:
        nonlocal written
        written += n
        if written > 500_000:  # of about 3 x 271 kB
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        api.merge_each(base, adapters, tmp_path / "out", progress=interrupt_midway, **options)
    time.sleep(0.2)  # the writer thread may still commit the shard it was on
    kept = {}
    for adapter in adapters:
        staging = tmp_path / "out" / f".{adapter.name}.lorastream-partial"
        assert not (tmp_path / "out" / adapter.name).exists() and (staging / MANIFEST).exists()
        kept[adapter.name] = {p.name: p.stat().st_ino for p in staging.glob("model-*.safetensors")}
        assert kept[adapter.name], f"{adapter.name}: some shards were finished before the interruption"

    api.merge_each(base, adapters, tmp_path / "out", **options)
    for adapter in adapters:
        each = tmp_path / "out" / adapter.name
        alone = api.merge(base, adapter, tmp_path / "alone" / adapter.name, **options).out_dir
        names = sorted(p.name for p in alone.iterdir())
        assert filecmp.cmpfiles(alone, each, names, shallow=False)[1:] == ([], [])
        for name, inode in kept[adapter.name].items():  # kept, not rewritten
            assert (each / name).stat().st_ino == inode


def test_each_with_transposed_dora_reads_its_norm_pass_in_schedule(tmp_path: Path, smallest_blocks: None) -> None:
    """Two GPT-2 adapters on the same Conv1D weights, one DoRA: its column norms need a first pass over the
    blocks (two passes read, one for the other adapter), and both outputs still equal their merges alone."""
    dora = build_case(tmp_path / "build-dora", tiny_gpt2(), torch.float32, target_modules=["c_fc", "c_attn"], r=4,
                      lora_alpha=8, use_dora=True)
    plain = build_case(tmp_path / "build-plain", tiny_gpt2(), torch.float32, target_modules=["c_fc"], r=2,
                       lora_alpha=4)
    adapters = [dora.adapter.rename(tmp_path / "dora"), plain.adapter.rename(tmp_path / "plain")]
    api.merge_each(dora.base, adapters, tmp_path / "each", max_memory=IN_PROCESS_BUDGET)
    for adapter in adapters:
        alone = api.merge(dora.base, adapter, tmp_path / "alone" / adapter.name, max_memory=IN_PROCESS_BUDGET).out_dir
        names = sorted(p.name for p in alone.iterdir())
        assert filecmp.cmpfiles(alone, tmp_path / "each" / adapter.name, names, shallow=False)[1:] == ([], [])


def test_an_adapter_laid_out_unlike_the_first_is_refused_naming_the_difference(three: tuple[Path, list[Path]],
                                                                                tmp_path: Path) -> None:
    """An adapter that resizes the vocabulary cannot share the pass: the refusal names the tensor and both shapes."""
    base, adapters = three
    resized = build_case(tmp_path / "build", tiny_llama(), torch.bfloat16, r=4, target_modules=["q_proj"],
                         modules_to_save=["embed_tokens", "lm_head"],
                         prepare=lambda model: model.resize_token_embeddings(392)).adapter
    with pytest.raises(InputError) as refused:
        api.merge_each(base, [adapters[0], resized], tmp_path / "out", max_memory=IN_PROCESS_BUDGET)
    message = str(refused.value)
    assert str(resized) in message and "alpha" in message and "on its own" in message
    assert re.search(r"has (lm_head|model\.embed_tokens)\.weight \[392, 64\] \(\d+ bytes\), against \[384, 64\]",
                     message), message
    assert not (tmp_path / "out").exists()
