"""BASE as a Hub repo id (`org/name`), found in a Hugging Face cache laid out as huggingface_hub lays it out
(HF_HOME/hub/models--org--name: blobs, refs/main, snapshots/<commit>/ of symlinks), as from_pretrained finds it
offline; `merge ADAPTER -o OUT` takes the base from the adapter's base_model_name_or_path."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

import lorastream

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def make_cache(home: Path, repo_id: str, folder: Path) -> Path:
    """`folder`'s files as the snapshot COMMIT of `repo_id` (refs/main -> COMMIT), blobs named by content hash."""
    repo = home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for path in sorted(folder.iterdir()):
        blob = hashlib.sha256(path.read_bytes()).hexdigest()
        shutil.copy2(path, repo / "blobs" / blob)
        (snapshot / path.name).symlink_to(Path("..") / ".." / "blobs" / blob)
    return snapshot


def run_cli(home: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run([sys.executable, "-m", "lorastream", "merge", *map(str, args), "-q"], capture_output=True,
                          text=True, env=env, check=False)


def tensors(folder: Path) -> dict[str, object]:
    found: dict[str, object] = {}
    for path in sorted(folder.glob("*.safetensors")):
        found.update(load_file(path))
    return found


def assert_same_tensors(a: Path, b: Path) -> None:
    ours, theirs = tensors(a), tensors(b)
    assert ours.keys() == theirs.keys()
    assert all(ours[n].equal(theirs[n]) for n in ours)  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def reference(demo_inputs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    base, adapter = demo_inputs
    return lorastream.merge(base, adapter, tmp_path_factory.mktemp("ref") / "out").out_dir


def test_a_repo_id_is_read_from_the_local_cache(demo_inputs: tuple[Path, Path], reference: Path,
                                                tmp_path: Path) -> None:
    base, adapter = demo_inputs
    snapshot = make_cache(tmp_path / "hf", "tiny-org/tiny-llama", base)
    done = run_cli(tmp_path / "hf", "tiny-org/tiny-llama", adapter, "-o", tmp_path / "out", "--revision", COMMIT)
    assert done.returncode == 0, done.stderr
    assert_same_tensors(tmp_path / "out", reference)
    record = json.loads((tmp_path / "out" / "lorastream.json").read_text())
    assert record["base"] == str(snapshot)


def test_the_base_comes_from_the_adapter_config(demo_inputs: tuple[Path, Path], reference: Path,
                                                tmp_path: Path) -> None:
    base, adapter = demo_inputs
    make_cache(tmp_path / "hf", "tiny-org/tiny-llama", base)
    named = tmp_path / "adapter"
    shutil.copytree(adapter, named)
    config = json.loads((named / "adapter_config.json").read_text())
    (named / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "tiny-org/tiny-llama"}))
    done = run_cli(tmp_path / "hf", named, "-o", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    assert_same_tensors(tmp_path / "out", reference)


def test_a_repo_id_missing_offline_is_one_line(demo_inputs: tuple[Path, Path], tmp_path: Path) -> None:
    (tmp_path / "hf").mkdir()
    done = run_cli(tmp_path / "hf", "tiny-org/not-cached", demo_inputs[1], "-o", tmp_path / "out")
    assert done.returncode == 2
    assert done.stderr.startswith("lorastream: error: tiny-org/not-cached: not a folder, and not in the Hugging Face "
                                  "cache") and "HF_HUB_OFFLINE" in done.stderr
    assert len(done.stderr.splitlines()) == 1 and not (tmp_path / "out").exists()
