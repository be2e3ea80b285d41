"""Never half-written, never fooled: resume after kill -9, locks, disk full, NaN refusal."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorastream
from lorastream.io.staging import MANIFEST


def command(base: Path, adapter: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lorastream", "merge", str(base), str(adapter), "-o", str(out),
            "--max-shard-size", "8MB", "--quiet", *extra]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix == ".safetensors"}


@pytest.fixture(scope="module")
def reference(demo_inputs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("ref") / "out"
    subprocess.run(command(*demo_inputs, out), check=True)
    return folder_bytes(out)


def finished_shards(staging: Path) -> int:
    try:
        return len(json.loads((staging / MANIFEST).read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return -1 if not staging.exists() else 0


@pytest.mark.parametrize("kill_after", [0, 1, 4])
def test_kill_9_mid_merge_then_rerun_is_bit_identical(demo_inputs: tuple[Path, Path], reference: dict[str, bytes],
                                                      tmp_path: Path, kill_after: int) -> None:
    """SIGKILL once `kill_after` shards are committed (0: as soon as the staging folder exists); whatever
    state that leaves, the same command afterwards produces the uninterrupted run's bytes."""
    out = tmp_path / "out"
    staging = tmp_path / ".out.lorastream-partial"
    process = subprocess.Popen(command(*demo_inputs, out))
    deadline = time.monotonic() + 60
    while finished_shards(staging) < kill_after and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    process.send_signal(signal.SIGKILL)
    process.wait()
    if (out / "model.safetensors.index.json").exists():  # it finished first: then it is complete
        assert folder_bytes(out) == reference
    else:
        assert not out.exists()
    done = subprocess.run(command(*demo_inputs, out, "--overwrite"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert folder_bytes(out) == reference
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_interrupted_run_resumes_finished_shards(demo_inputs: tuple[Path, Path], reference: dict[str, bytes],
                                                 tmp_path: Path) -> None:
    out = tmp_path / "out"
    written = 0

    def interrupt_midway(n: int) -> None:
        nonlocal written
        written += n
        if written > 40 << 20:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        lorastream.merge(*demo_inputs, out, max_shard_size="8MB", progress=interrupt_midway)
    staging = tmp_path / ".out.lorastream-partial"
    assert not out.exists() and (staging / MANIFEST).exists()
    time.sleep(0.2)  # the writer thread may still commit the shard it was on
    kept = {p.name: p.stat().st_ino for p in staging.glob("model-*.safetensors")}
    assert kept, "some shards were finished before the interruption"

    lorastream.merge(*demo_inputs, out, max_shard_size="8MB")
    assert folder_bytes(out) == reference
    for name, inode in kept.items():  # kept, not rewritten
        assert (out / name).stat().st_ino == inode


def test_partial_output_of_another_job_is_refused(demo_inputs: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        lorastream.merge(*demo_inputs, out, max_shard_size="8MB", progress=lambda _n: (_ for _ in ()).throw(
            KeyboardInterrupt))
    done = subprocess.run(command(*demo_inputs, out, "--dtype", "float32"), capture_output=True, text=True)
    assert done.returncode == 2
    assert "different merge" in done.stderr and "--overwrite" in done.stderr
    assert subprocess.run(command(*demo_inputs, out, "--dtype", "float32", "--overwrite")).returncode == 0


def test_second_merge_into_the_same_output_refuses(demo_inputs: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    lock = os.open(tmp_path / ".out.lorastream.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        done = subprocess.run(command(*demo_inputs, out), capture_output=True, text=True)
    finally:
        os.close(lock)
    assert done.returncode == 2
    assert "another lorastream merge is writing" in done.stderr
    assert not out.exists()


def test_disk_full_exits_3_and_leaves_nothing(demo_inputs: tuple[Path, Path], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write
    budget = [30 << 20]

    def filling_write(fd: int, data: bytes | memoryview) -> int:
        if len(data) > 4096:
            budget[0] -= len(data)
            if budget[0] < 0:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", filling_write)
    monkeypatch.setattr(os, "copy_file_range", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EXDEV, "x")))
    with pytest.raises(lorastream.ResourceError, match="disk filled"):
        lorastream.merge(*demo_inputs, tmp_path / "out", max_shard_size="8MB")
    assert list(tmp_path.iterdir()) == []


def test_nonfinite_merge_is_refused_unless_allowed(demo_inputs: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = demo_inputs
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    tensors = load_file(adapter / "adapter_model.safetensors")
    name = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    tensors[name][3, 0] = float("nan")
    save_file(tensors, broken / "adapter_model.safetensors")
    done = subprocess.run(command(base, broken, tmp_path / "out"), capture_output=True, text=True)
    assert done.returncode == 2
    assert "model.layers.1.mlp.up_proj.weight" in done.stderr and "NaN" in done.stderr
    assert "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]
    allowed = subprocess.run(command(base, broken, tmp_path / "out", "--allow-nonfinite"))
    assert allowed.returncode == 0
    merged = load_file(tmp_path / "out" / next(p.name for p in (tmp_path / "out").glob("*.safetensors")
                                                   if "model.layers.1.mlp.up_proj.weight" in load_file(p)))
    assert torch.isnan(merged["model.layers.1.mlp.up_proj.weight"]).any()


FAULT_SCRIPT = """
import os, sys, runpy
mode, limit = sys.argv[1], int(sys.argv[2])
sys.argv = ["lorastream"] + sys.argv[3:]
if mode == "die-after-bytes":  # an abrupt death (no cleanup at all, like kill -9) after `limit` bytes
    real_write, real_copy = os.write, os.copy_file_range
    state = {"left": limit}
    def spend(n):
        state["left"] -= n
        if state["left"] < 0:
            os._exit(137)
    def write(fd, data):
        spend(len(data))
        return real_write(fd, data)
    def copy_file_range(src, dst, count, *args):
        spend(count)
        return real_copy(src, dst, count, *args)
    os.write, os.copy_file_range = write, copy_file_range
elif mode == "fail-rename":  # the `limit`-th rename fails
    real_replace = os.replace
    state = {"n": 0}
    def replace(a, b):
        state["n"] += 1
        if state["n"] == limit:
            raise OSError(5, "Input/output error", str(b))
        return real_replace(a, b)
    os.replace = replace
runpy.run_module("lorastream", run_name="__main__")
"""


def run_with_fault(tmp_path: Path, mode: str, limit: int, args: list[str],
                   preexec: object = None) -> subprocess.CompletedProcess[str]:
    script = tmp_path.parent / f"fault-{tmp_path.name}.py"
    script.write_text(FAULT_SCRIPT)
    return subprocess.run([sys.executable, str(script), mode, str(limit), *args[3:]], capture_output=True,
                          text=True, preexec_fn=preexec)  # type: ignore[arg-type]


@pytest.mark.parametrize("limit", [0, 1_000, 3 << 20, 11 << 20, 25 << 20, 47 << 20, 70 << 20, 84 << 20])
def test_abrupt_death_after_k_bytes_then_rerun_is_bit_identical(demo_inputs: tuple[Path, Path],
                                                                reference: dict[str, bytes], tmp_path: Path,
                                                                limit: int) -> None:
    out = tmp_path / "out"
    args = command(*demo_inputs, out)
    died = run_with_fault(tmp_path, "die-after-bytes", limit, args)
    assert died.returncode == 137
    assert not out.exists(), "no incomplete folder may pass as the output"
    done = subprocess.run(args, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert folder_bytes(out) == reference
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("nth", [1, 3, 10])
def test_failing_rename_is_a_clean_refusal_and_rerun_completes(demo_inputs: tuple[Path, Path],
                                                               reference: dict[str, bytes], tmp_path: Path,
                                                               nth: int) -> None:
    out = tmp_path / "out"
    args = command(*demo_inputs, out)
    failed = run_with_fault(tmp_path, "fail-rename", nth, args)
    assert failed.returncode == 5, failed.stderr
    assert "Input/output error" in failed.stderr and "Traceback" not in failed.stderr
    assert not (out / "model.safetensors.index.json").exists()
    assert subprocess.run(args, capture_output=True).returncode == 0
    assert folder_bytes(out) == reference


def test_file_size_limit_exits_3_and_leaves_nothing(demo_inputs: tuple[Path, Path], tmp_path: Path) -> None:
    """RLIMIT_FSIZE makes writes past 5 MB fail with EFBIG, as a full or quota-limited disk would."""
    import resource

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (5 << 20, 5 << 20))

    done = subprocess.run(command(*demo_inputs, tmp_path / "out"), capture_output=True, text=True,
                          preexec_fn=limit_file_size)
    assert done.returncode == 3, done.stderr
    assert "disk filled" in done.stderr and "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("field", "value", "message"), [
    ("num_hidden_layers", 7, "num_hidden_layers is 7, the weights hold 4 layers"),
    ("hidden_size", 1024, "hidden_size is 1024, tensor 'model.embed_tokens.weight' has shape [32000, 512]"),
    ("vocab_size", 32001, "vocab_size is 32001"),
])
def test_config_disagreeing_with_tensors_is_refused(demo_inputs: tuple[Path, Path], tmp_path: Path, field: str,
                                                    value: int, message: str) -> None:
    base, adapter = demo_inputs
    copy = tmp_path / "base"
    copy.mkdir()
    for path in base.iterdir():
        os.link(path, copy / path.name)  # hard links: symlinks out of the folder are refused
    config = json.loads((base / "config.json").read_text())
    (copy / "config.json").unlink()
    (copy / "config.json").write_text(json.dumps({**config, field: value}))
    done = subprocess.run(command(copy, adapter, tmp_path / "out"), capture_output=True, text=True)
    assert done.returncode == 2
    assert message in done.stderr and "config.json" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()
