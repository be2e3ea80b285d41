"""The command line, run as a user runs it: `python -m lorastream ...` in a fresh process.

Every run costs a fresh interpreter (~2 s of imports), so the module starts all of them at once, a few
at a time, on one small demo model and adapter, and each test then checks the run it is about.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lorastream
from lorastream.demo import build_demo_adapter, build_demo_model

MiB = 2**20
SHARD_LIMIT = 40 * 10**6
ADAPTER_PREFIX = "base_model.model.model.layers.0.self_attn.q_proj"


@dataclass(frozen=True)
class Run:
    """One finished command: its arguments, exit status and output."""

    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return f"lorastream {' '.join(self.args)} -> {self.returncode}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"


def run_cli(*args: str | Path, program: list[str] | None = None) -> Run:
    """Run the command line in a new interpreter and capture what it prints."""
    argv = [str(a) for a in args]
    command = (program or [sys.executable, "-m", "lorastream"]) + argv
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False, stdin=subprocess.DEVNULL)
    return Run(tuple(argv), done.returncode, done.stdout, done.stderr)


@dataclass(frozen=True)
class Demo:
    """The demo model, its adapter, broken variants of both, and a folder per command."""

    root: Path
    base: Path
    adapter: Path

    def case(self, name: str) -> Path:
        """A fresh, empty parent folder for one command's output (`<case>/out`)."""
        return self.root / "cases" / name / "out"


def adapter_variant(demo: Path, source: Path, name: str, tensors: dict[str, torch.Tensor] | None = None,
                    config: dict[str, object] | None = None) -> Path:
    """A copy of the adapter with its tensors and/or config replaced."""
    folder = demo / name
    shutil.copytree(source, folder)
    if tensors is not None:
        save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    if config is not None:
        (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    root = tmp_path_factory.mktemp("cli")
    base, adapter = root / "base", root / "adapter"
    build_demo_model(base)
    build_demo_adapter(adapter)
    return Demo(root, base, adapter)


def prepare_commands(demo: Demo) -> dict[str, tuple[str | Path, ...]]:
    """Build the broken inputs and pre-existing folders, and name every command the tests check."""
    root, base, adapter = demo.root, demo.base, demo.adapter
    lora = load_file(adapter / "adapter_model.safetensors")
    config = json.loads((adapter / "adapter_config.json").read_text())

    vera = adapter_variant(root, adapter, "adapter_vera", config={**config, "peft_type": "VERA"})
    wrong = dict(lora)
    wrong[f"{ADAPTER_PREFIX}.lora_A.weight"] = torch.randn(8, 100)  # base q_proj takes 512 inputs
    wrong_shape = adapter_variant(root, adapter, "adapter_wrong_shape", tensors=wrong)
    renamed = {k.replace("self_attn.q_proj", "self_attn.qkv_fused"): v for k, v in lora.items()}
    missing_module = adapter_variant(root, adapter, "adapter_missing_module", tensors=renamed)
    corrupt = root / "base_corrupt"
    shutil.copytree(base, corrupt)
    shard = corrupt / "model-00002-of-00002.safetensors"
    os.truncate(shard, shard.stat().st_size - 1000)

    existing = demo.case("existing")
    existing.mkdir(parents=True)
    (existing / "keep.txt").write_text("mine")
    stale = demo.case("overwrite")
    stale.mkdir(parents=True)
    (stale / "stale.txt").write_text("old")
    for name in ("merge", "missing_base", "vera", "wrong_shape", "missing_module", "dtype_int8", "bad_size",
                 "corrupt_base", "merge_low_memory", "plan_low_memory", "plan", "plan_json"):
        demo.case(name).parent.mkdir(parents=True)

    job = (base, adapter)
    return {
        "merge": ("merge", *job, "-o", demo.case("merge"), "--max-shard-size", "40MB", "--max-memory", "512MiB",
                  "--json"),
        "overwrite": ("merge", *job, "-o", stale, "--overwrite", "--quiet"),
        "missing_base": ("merge", root / "no_such_model", adapter, "-o", demo.case("missing_base")),
        "vera": ("merge", base, vera, "-o", demo.case("vera")),
        "wrong_shape": ("merge", base, wrong_shape, "-o", demo.case("wrong_shape")),
        "missing_module": ("merge", base, missing_module, "-o", demo.case("missing_module")),
        "dtype_int8": ("merge", *job, "-o", demo.case("dtype_int8"), "--dtype", "int8"),
        "bad_size": ("merge", *job, "-o", demo.case("bad_size"), "--max-memory", "lots"),
        "corrupt_base": ("merge", corrupt, adapter, "-o", demo.case("corrupt_base")),
        "existing": ("merge", *job, "-o", existing),
        "merge_low_memory": ("merge", *job, "-o", demo.case("merge_low_memory"), "--max-memory", "100MiB"),
        "plan_low_memory": ("plan", *job, "-o", demo.case("plan_low_memory"), "--max-memory", "100MiB"),
        "plan": ("plan", *job, "-o", demo.case("plan"), "--max-shard-size", "40MB"),
        "plan_json": ("plan", *job, "-o", demo.case("plan_json"), "--json"),
        "inspect_base": ("inspect", base),
        "inspect_adapter": ("inspect", adapter),
        "inspect_file": ("inspect", base / "model-00001-of-00002.safetensors"),
        "inspect_json": ("inspect", adapter, "--json"),
        "help": ("--help",),
    }


@pytest.fixture(scope="module")
def runs(demo: Demo) -> dict[str, Run]:
    """Every command of `prepare_commands`, run concurrently; the console script's --version too."""
    commands = prepare_commands(demo)
    script = Path(sys.executable).with_name("lorastream")
    workers = max(2, min(4, os.cpu_count() or 2))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {name: pool.submit(run_cli, *args) for name, args in commands.items()}
        futures["version"] = pool.submit(run_cli, "--version", program=[str(script)])
        return {name: future.result() for name, future in futures.items()}


def assert_no_traceback(run: Run) -> None:
    assert "Traceback" not in run.stderr and "Traceback" not in run.stdout, str(run)


def assert_nothing_written(out: Path) -> None:
    """No output folder and no hidden staging folder beside it."""
    assert not out.exists()
    assert list(out.parent.iterdir()) == [], f"left behind: {list(out.parent.iterdir())}"


# --- a successful merge ------------------------------------------------------------------------------------------

def test_merge_json_summary(runs: dict[str, Run], demo: Demo) -> None:
    run = runs["merge"]
    assert run.returncode == 0, str(run)
    assert_no_traceback(run)
    summary = json.loads(run.stdout)
    assert set(summary) == {"out_dir", "files", "bytes_written", "seconds", "peak_rss", "budget",
                            "up_to_date", "changed"}
    assert summary["changed"]["language model"] > 0
    out = demo.case("merge")
    assert summary["out_dir"] == str(out)
    assert summary["files"] == sorted(p.name for p in out.iterdir())
    assert summary["budget"] == 512 * MiB
    assert summary["seconds"] > 0
    assert re.search(r"Memory used: peak RSS [\d.]+ MiB of a 512\.0 MiB budget", run.stderr), run.stderr


def test_merge_stays_within_max_memory(runs: dict[str, Run]) -> None:
    peak = json.loads(runs["merge"].stdout)["peak_rss"]
    assert 50 * MiB < peak <= 512 * MiB


def test_merge_output_folder(runs: dict[str, Run], demo: Demo) -> None:
    """Shards named as transformers names them, the index, the config, carried files and provenance."""
    out = demo.case("merge")
    names = {p.name for p in out.iterdir()}
    shards = sorted(n for n in names if n.endswith(".safetensors"))
    count = len(shards)
    assert count >= 2, shards
    assert shards == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    assert names == {*shards, "config.json", "model.safetensors.index.json", "generation_config.json",
                     "lorastream.json"}
    assert list(out.parent.iterdir()) == [out], "no staging or old folder left beside the output"
    assert json.loads((out / "config.json").read_text()) == json.loads((demo.base / "config.json").read_text())
    assert (out / "generation_config.json").read_bytes() == (demo.base / "generation_config.json").read_bytes()

    provenance = json.loads((out / "lorastream.json").read_text())
    assert provenance["producer"] == "lorastream" and provenance["version"] == lorastream.__version__
    assert provenance["base"] == str(demo.base.absolute())
    assert provenance["adapters"] == [{"path": str(demo.adapter.absolute()), "weight": 1.0}]
    assert provenance["options"]["max_memory"] == 512 * MiB
    assert provenance["options"]["max_shard_size"] == SHARD_LIMIT


def test_merge_index_and_shards_agree(runs: dict[str, Run], demo: Demo) -> None:
    """The index maps every tensor to the shard holding it; total_size is the sum of tensor bytes."""
    out = demo.case("merge")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    located: dict[str, str] = {}
    total = 0
    for shard in sorted(out.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            assert f.metadata().get("format") == "pt", "transformers requires format=pt"
        tensors = load_file(shard)
        shard_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        assert shard_bytes <= SHARD_LIMIT or len(tensors) == 1, (shard.name, shard_bytes)
        total += shard_bytes
        located.update(dict.fromkeys(tensors, shard.name))
    assert index["weight_map"] == located
    assert index["metadata"]["total_size"] == total
    assert json.loads(runs["merge"].stdout)["bytes_written"] == total
    base_names = json.loads((demo.base / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(located) == set(base_names)


def test_merge_changes_only_adapted_tensors(demo: Demo, runs: dict[str, Run]) -> None:
    """Guard against a vacuous merge: targets differ from the base, the rest is byte-identical."""
    merged: dict[str, torch.Tensor] = {}
    for shard in demo.case("merge").glob("*.safetensors"):
        merged.update(load_file(shard))
    base: dict[str, torch.Tensor] = {}
    for shard in demo.base.glob("*.safetensors"):
        base.update(load_file(shard))
    for name, tensor in base.items():
        assert merged[name].dtype == tensor.dtype and merged[name].shape == tensor.shape, name
        adapted = any(f".{target}." in name for target in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj"))
        assert torch.equal(merged[name], tensor) != adapted, name


# --- refusals: exit 2, one line, nothing written -----------------------------------------------------------------

INPUT_ERRORS = {
    "missing_base": "no_such_model",
    "vera": "VERA",
    "wrong_shape": "q_proj",
    "missing_module": "qkv_fused",
    "bad_size": "lots",
    "corrupt_base": "model-00002-of-00002.safetensors",
}


@pytest.mark.parametrize("name", INPUT_ERRORS)
def test_bad_input_exits_2_with_one_line(runs: dict[str, Run], demo: Demo, name: str) -> None:
    run = runs[name]
    assert run.returncode == 2, str(run)
    assert_no_traceback(run)
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lorastream: error: "), run.stderr
    assert INPUT_ERRORS[name] in lines[0], lines[0]
    assert_nothing_written(demo.case(name))


def test_bad_dtype_is_usage_error(runs: dict[str, Run], demo: Demo) -> None:
    run = runs["dtype_int8"]
    assert run.returncode == 2, str(run)
    assert_no_traceback(run)
    assert "int8" in run.stderr and "--dtype" in run.stderr
    assert_nothing_written(demo.case("dtype_int8"))


def test_existing_output_folder_is_left_untouched(runs: dict[str, Run], demo: Demo) -> None:
    run = runs["existing"]
    assert run.returncode == 2, str(run)
    assert_no_traceback(run)
    assert "--overwrite" in run.stderr
    out = demo.case("existing")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "mine"
    assert list(out.parent.iterdir()) == [out]


def test_overwrite_replaces_existing_folder(runs: dict[str, Run], demo: Demo) -> None:
    run = runs["overwrite"]
    assert run.returncode == 0, str(run)
    assert run.stdout == ""
    out = demo.case("overwrite")
    names = {p.name for p in out.iterdir()}
    assert "stale.txt" not in names and {"config.json", "model.safetensors", "lorastream.json"} <= names
    assert list(out.parent.iterdir()) == [out], "the old folder and the staging folder are gone"
    assert "Memory used: peak RSS" in run.stderr


# --- not enough memory: exit 3 before anything is written --------------------------------------------------------

def test_merge_below_baseline_exits_3(runs: dict[str, Run], demo: Demo) -> None:
    run = runs["merge_low_memory"]
    assert run.returncode == 3, str(run)
    assert_no_traceback(run)
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert "--max-memory 100.0 MiB" in lines[0]
    needed = re.search(r"use --max-memory (\d+)MiB", lines[0])
    assert needed and int(needed.group(1)) > 100, lines[0]
    assert_nothing_written(demo.case("merge_low_memory"))


def test_plan_below_baseline_prints_plan_and_exits_3(runs: dict[str, Run], demo: Demo) -> None:
    run = runs["plan_low_memory"]
    assert run.returncode == 3, str(run)
    assert_no_traceback(run)
    assert "shards" in run.stdout and "targets" in run.stdout and "budget 100.0 MiB" in run.stdout
    assert re.search(r"--max-memory \d+MiB", run.stderr), run.stderr
    assert_nothing_written(demo.case("plan_low_memory"))


# --- plan --------------------------------------------------------------------------------------------------------

def test_plan_shows_shards_and_targets(runs: dict[str, Run], demo: Demo) -> None:
    run = runs["plan"]
    assert run.returncode == 0, str(run)
    assert_no_traceback(run)
    merged = json.loads(runs["merge"].stdout)["files"]
    for shard in (n for n in merged if n.endswith(".safetensors")):
        assert shard in run.stdout, "plan announces the shards merge writes"
    targets = re.findall(r"^  (\S+)  <-  (\S+)$", run.stdout, flags=re.MULTILINE)
    assert len(targets) == 28
    assert ("model.layers.0.self_attn.q_proj.weight", f"{demo.adapter}:model.layers.0.self_attn.q_proj") in targets
    assert_nothing_written(demo.case("plan"))


def test_plan_json(runs: dict[str, Run], demo: Demo) -> None:
    run = runs["plan_json"]
    assert run.returncode == 0, str(run)
    plan = json.loads(run.stdout)
    assert plan["fits"] is True
    assert plan["minimum_budget"] <= plan["budget"]
    assert [s["file"] for s in plan["shards"]] == ["model.safetensors"]
    assert plan["total_size"] == sum(s["bytes"] for s in plan["shards"]) == json.loads(
        runs["merge"].stdout)["bytes_written"]
    assert len(plan["targets"]) == 28
    assert_nothing_written(demo.case("plan_json"))


# --- inspect, help, version --------------------------------------------------------------------------------------

def test_inspect_base_folder(runs: dict[str, Run]) -> None:
    run = runs["inspect_base"]
    assert run.returncode == 0, str(run)
    fields = dict(line.split(None, 1) for line in run.stdout.splitlines() if not line.startswith(" "))
    assert fields["format"] == "hf-safetensors" and fields["model_type"] == "llama"
    assert fields["tensors"] == "39"


def test_inspect_adapter_folder(runs: dict[str, Run]) -> None:
    run = runs["inspect_adapter"]
    assert run.returncode == 0, str(run)
    fields = dict(line.split(None, 1) for line in run.stdout.splitlines() if line and not line.startswith(" ")
                  and line != "modules")
    assert fields["format"] == "peft-lora" and fields["r"] == "8" and fields["lora_alpha"] == "16"
    assert "modules" in run.stdout.splitlines()
    assert "  model.layers.3.mlp.down_proj  r=8 scale=2" in run.stdout.splitlines()


def test_inspect_single_file(runs: dict[str, Run], demo: Demo) -> None:
    run = runs["inspect_file"]
    assert run.returncode == 0, str(run)
    fields = dict(line.split(None, 1) for line in run.stdout.splitlines())
    assert fields["format"] == "safetensors"
    with safe_open(demo.base / "model-00001-of-00002.safetensors", "pt") as f:
        assert fields["tensors"] == str(len(list(f.keys())))


def test_inspect_json(runs: dict[str, Run]) -> None:
    run = runs["inspect_json"]
    assert run.returncode == 0, str(run)
    info = json.loads(run.stdout)
    assert info["format"] == "peft-lora" and info["r"] == 8 and info["lora_alpha"] == 16
    assert len(info["modules"]) == 28
    assert info["modules"]["model.layers.0.self_attn.q_proj"] == {"rank": 8, "scale": 2.0, "embedding": False,
                                                                 "dora": False, "lora_bias": False}


def test_help_and_version(runs: dict[str, Run]) -> None:
    help_run = runs["help"]
    assert help_run.returncode == 0, str(help_run)
    for command in ("merge", "plan", "inspect"):
        assert re.search(rf"^\s+{command}\s", help_run.stdout, flags=re.MULTILINE), help_run.stdout
    version = runs["version"]
    assert version.returncode == 0, str(version)
    assert lorastream.__version__ in version.stdout
