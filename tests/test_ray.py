"""`--executor ray`: shards written by Ray tasks match the local merge byte for byte, survive a worker killed
mid-shard (Ray retries it) and a driver killed mid-job (the rerun resumes); batches run as Ray tasks.

One local Ray instance serves the whole module (starting Ray takes seconds). Faults are injected in the
workers by a module Ray imports in each of them (its `worker_process_setup_hook`), driven by files in a
folder the tests share with it: `die` (a worker dies after that many shard bytes, once), `delay` (seconds
to sleep before each shard write).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import ray
from click.testing import CliRunner
from conftest import IN_PROCESS_BUDGET
from test_remote import contents, local_files, remote_files

import lorastream
from lorastream import demo
from lorastream.cli import main
from lorastream.io.staging import MANIFEST

SHARD = "4MB"  # 10 shards, so 10 tasks
BUCKET = "lorastream-ray-test"
# Above the pytest process itself (ray, the S3 server and the reference libraries held: about 1 GiB in CI).
BUDGET = IN_PROCESS_BUDGET

HOOK = '''
import os, time

FAULTS = os.environ["LORASTREAM_TEST_FAULTS"]


def _is_shard(fd):
    try:
        path = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return False
    return ".lorastream-partial/" in path and path.endswith(".safetensors.partial")


def arm():
    real_write, real_copy = os.write, os.copy_file_range
    state = {"left": None}

    def spend(fd, count):
        if not _is_shard(fd):
            return
        try:
            time.sleep(float(open(os.path.join(FAULTS, "delay")).read()))
        except FileNotFoundError:
            pass
        if state["left"] is None:
            claimed = os.path.join(FAULTS, f"died-{os.getpid()}")
            try:  # only the first worker to get here dies
                os.rename(os.path.join(FAULTS, "die"), claimed)
            except FileNotFoundError:
                return
            state["left"] = int(open(claimed).read())
        state["left"] -= count
        if state["left"] < 0:
            os._exit(137)

    def write(fd, data):
        spend(fd, len(data))
        return real_write(fd, data)

    def copy_file_range(src, dst, count, *args):
        spend(dst, count)
        return real_copy(src, dst, count, *args)

    os.write, os.copy_file_range = write, copy_file_range
'''

DRIVER = """
import json, runpy, sys
import ray
ray.init(address=sys.argv[1], runtime_env=json.loads(sys.argv[2]), logging_level="WARNING")
sys.argv = ["lorastream", *sys.argv[3:]]
runpy.run_module("lorastream", run_name="__main__")
"""


@dataclass(frozen=True)
class Cluster:
    faults: Path
    address: str
    runtime_env: dict[str, Any]


@pytest.fixture(scope="module")
def s3(s3_server: tuple[Any, dict[str, str]]) -> tuple[Any, dict[str, str]]:
    """The server's filesystem with this module's bucket, and the variables Ray workers need to reach it."""
    s3_server[0].mkdir(BUCKET)
    return s3_server


@pytest.fixture(scope="module")
def cluster(s3: tuple[Any, dict[str, str]], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    faults = tmp_path_factory.mktemp("ray-faults")
    (faults / "lorastream_ray_faults.py").write_text(HOOK)
    # the driver's PYTHONPATH too, so workers import the lorastream under test (a worktree's, say)
    path = os.pathsep.join([str(faults), *filter(None, [os.environ.get("PYTHONPATH")])])
    runtime_env = {"env_vars": {"PYTHONPATH": path, "LORASTREAM_TEST_FAULTS": str(faults), **s3[1]},
                   "worker_process_setup_hook": "lorastream_ray_faults.arm"}
    ray.init(num_cpus=2, include_dashboard=False, runtime_env=runtime_env, logging_level=logging.WARNING)
    try:
        yield Cluster(faults, ray.get_runtime_context().gcs_address, runtime_env)
    finally:
        ray.shutdown()


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def reference(demo_inputs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("ray-reference") / "out"
    lorastream.merge(*demo_inputs, out, max_shard_size=SHARD, max_memory=BUDGET)
    return folder_files(out)


def test_ray_merge_is_bit_identical_to_the_local_merge(cluster: Cluster, demo_inputs: tuple[Path, Path],
                                                       reference: dict[str, bytes], tmp_path: Path) -> None:
    result = lorastream.merge(*demo_inputs, tmp_path / "out", max_shard_size=SHARD, max_memory=BUDGET, executor="ray")
    assert sum(name.endswith(".safetensors") for name in result.files) == 10
    assert folder_files(tmp_path / "out") == reference  # shards, index, config and the provenance record
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_worker_killed_mid_shard_is_retried(cluster: Cluster, demo_inputs: tuple[Path, Path],
                                              reference: dict[str, bytes], tmp_path: Path) -> None:
    (cluster.faults / "die").write_text(str(1 << 20))
    lorastream.merge(*demo_inputs, tmp_path / "out", max_shard_size=SHARD, max_memory=BUDGET, executor="ray")
    [died] = cluster.faults.glob("died-*")
    died.unlink()
    with pytest.raises(ProcessLookupError):  # the worker really died, and Ray ran its task again
        os.kill(int(died.name.removeprefix("died-")), 0)
    assert folder_files(tmp_path / "out") == reference


def finished_shards(staging: Path) -> int:
    try:
        return len(json.loads((staging / MANIFEST).read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return 0


def test_a_killed_driver_then_rerun_resumes(cluster: Cluster, demo_inputs: tuple[Path, Path],
                                            reference: dict[str, bytes], tmp_path: Path) -> None:
    out, staging = tmp_path / "out", tmp_path / ".out.lorastream-partial"
    script = tmp_path.parent / f"driver-{tmp_path.name}.py"
    script.write_text(DRIVER)
    (cluster.faults / "delay").write_text("0.2")  # slow shard writes: the driver is surely killed mid-job
    try:
        driver = subprocess.Popen([sys.executable, str(script), cluster.address, json.dumps(cluster.runtime_env),
                                   "merge", *map(str, demo_inputs), "-o", str(out), "--max-shard-size", SHARD,
                                   "--max-memory", BUDGET, "--executor", "ray", "--quiet"])
        deadline = time.monotonic() + 120
        while finished_shards(staging) < 2 and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert driver.poll() is None, "the driver ended before it could be killed"
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    finally:
        (cluster.faults / "delay").unlink()
    assert not out.exists()
    recorded = json.loads((staging / MANIFEST).read_text())["shards"]
    kept = {name: (staging / name).stat().st_ino for name in recorded}
    assert 2 <= len(kept) < 10
    lorastream.merge(*demo_inputs, out, max_shard_size=SHARD, max_memory=BUDGET, executor="ray")
    assert folder_files(out) == reference
    for name, inode in kept.items():  # kept, not written again
        assert (out / name).stat().st_ino == inode


def test_batch_jobs_run_as_ray_tasks(cluster: Cluster, demo_inputs: tuple[Path, Path], reference: dict[str, bytes],
                                     tmp_path: Path) -> None:
    base, adapter = demo_inputs
    jobs = {"defaults": {"max_shard_size": SHARD, "max_memory": BUDGET},
            "jobs": [{"base": str(base), "adapter": str(adapter), "out": "one"},
                     {"base": str(base), "adapters": ["missing"], "out": "two"},
                     {"base": str(base), "adapters": [str(adapter)], "out": "three"}]}
    (tmp_path / "jobs.yaml").write_text(json.dumps(jobs))  # JSON is YAML
    done = CliRunner().invoke(main, ["batch", str(tmp_path / "jobs.yaml"), "--executor", "ray",
                                     "--continue-on-error", "--json"])
    assert done.exit_code == 6, done.output
    summary = json.loads(done.stdout)
    assert [j["status"] for j in summary["jobs"]] == ["ok", "failed", "ok"]
    assert str(tmp_path / "missing") in summary["jobs"][1]["error"] and summary["jobs"][1]["exit_code"] == 2
    assert folder_files(tmp_path / "one") == reference
    assert folder_files(tmp_path / "three") == reference
    assert not (tmp_path / "two").exists()


def test_remote_inputs_and_output(cluster: Cluster, s3: tuple[Any, dict[str, str]], tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers read the inputs from S3 and upload their shards to the staging prefix there themselves."""
    fs, _ = s3
    monkeypatch.setitem(demo.CONFIG, "num_hidden_layers", 1)  # a 7 MB model: S3 here is a Python server
    monkeypatch.setitem(demo.CONFIG, "vocab_size", 1024)
    demo.build_demo_model(tmp_path / "base")
    demo.build_demo_adapter(tmp_path / "adapter")
    fs.put(str(tmp_path / "base"), f"{BUCKET}/base", recursive=True)
    fs.put(str(tmp_path / "adapter"), f"{BUCKET}/adapter", recursive=True)
    lorastream.merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "local", max_shard_size="1MB",
                     max_memory=BUDGET)
    lorastream.merge(f"s3://{BUCKET}/base", f"s3://{BUCKET}/adapter", f"s3://{BUCKET}/out", max_shard_size="1MB",
                     max_memory=BUDGET, executor="ray")
    merged = remote_files(fs, f"{BUCKET}/out")
    assert sum(name.endswith(".safetensors") for name in merged) > 3
    assert contents(merged) == contents(local_files(tmp_path / "local"))
    assert fs.find(f"{BUCKET}/.out.lorastream-partial") == []


def test_without_ray_installed_the_error_is_one_line(demo_inputs: tuple[Path, Path], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if it were not installed
    done = CliRunner().invoke(main, ["merge", *map(str, demo_inputs), "-o", str(tmp_path / "out"), "--executor", "ray"])
    assert done.exit_code == 2
    assert done.stderr.strip() == ("lorastream: error: --executor ray needs Ray, which is not installed: "
                                   "pip install 'lorastream[ray]'")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["Mixtral", "LLaVA"])
def test_moe_and_vision_language_merges_on_ray_equal_the_local_merge(cluster: Cluster, name: str,
                                                                     tmp_path: Path) -> None:
    """Fused experts mapped onto per-expert tensors, and a VLM's renamed towers, written by Ray tasks."""
    from test_families import BY_NAME, _merge, load

    merged = _merge(BY_NAME[name], tmp_path)
    lorastream.merge(merged.case.base, merged.case.adapter, tmp_path / "ray", max_memory=BUDGET, executor="ray")
    shards = sorted(p.name for p in merged.out.glob("*.safetensors"))
    assert shards == sorted(p.name for p in (tmp_path / "ray").glob("*.safetensors"))
    for shard in shards:
        assert load((tmp_path / "ray" / shard).read_bytes()) == load((merged.out / shard).read_bytes())
