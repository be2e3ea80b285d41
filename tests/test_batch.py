"""`lorastream batch JOBS.yaml`: every job checked before the first runs, failures summarized, exit status 6."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner, Result
from conftest import IN_PROCESS_BUDGET

import lorastream
from lorastream.cli import main


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def run_batch(folder: Path, document: object, *options: str) -> Result:
    (folder / "jobs.yaml").write_text(yaml.safe_dump(document))
    return CliRunner().invoke(main, ["batch", str(folder / "jobs.yaml"), *options])


def three_jobs(base: Path, adapter: Path) -> dict[str, object]:
    """The second job names an adapter that does not exist; paths are relative to the YAML file's folder."""
    return {"defaults": {"max_memory": IN_PROCESS_BUDGET},
            "jobs": [{"base": str(base), "adapter": str(adapter), "out": "one", "max_shard_size": "8MB"},
                     {"base": str(base), "adapters": ["missing-adapter"], "out": "two"},
                     {"base": str(base), "adapters": [str(adapter), str(adapter)], "weights": [0.5, 0.25],
                      "dtype": "float16", "out": "three"}]}


def test_a_failed_job_is_summarized_and_the_others_match_single_merges(demo_inputs: tuple[Path, Path],
                                                                       tmp_path: Path) -> None:
    base, adapter = demo_inputs
    done = run_batch(tmp_path, three_jobs(base, adapter), "--continue-on-error")
    assert done.exit_code == 6, done.output
    lines = done.stdout.splitlines()
    assert [line.split()[:2] for line in lines[1:3]] == [["1", "ok"], ["2", "failed"]]
    assert f"failed: {tmp_path / 'missing-adapter'}:" in lines[3]
    assert lines[-1] == "2 of 3 jobs succeeded"
    single = tmp_path / "single"
    lorastream.merge(base, adapter, single / "one", max_memory=IN_PROCESS_BUDGET, max_shard_size="8MB")
    lorastream.merge(base, [adapter, adapter], single / "three", max_memory=IN_PROCESS_BUDGET, weights=[0.5, 0.25],
                     dtype="float16")
    assert folder_files(tmp_path / "one") == folder_files(single / "one")
    assert folder_files(tmp_path / "three") == folder_files(single / "three")
    assert not (tmp_path / "two").exists()


def test_after_a_failure_the_rest_is_skipped_unless_asked(demo_inputs: tuple[Path, Path], tmp_path: Path) -> None:
    done = run_batch(tmp_path, three_jobs(*demo_inputs), "--json")
    assert done.exit_code == 6
    summary = json.loads(done.stdout)
    assert [(j["index"], j["status"], j["exit_code"]) for j in summary["jobs"]] == [
        (1, "ok", 0), (2, "failed", 2), (3, "skipped", 0)]
    assert summary["succeeded"] == 1 and summary["total"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jobs.yaml", "one"]


@pytest.mark.parametrize(("job", "message"), [
    ({"adapters": ["a"], "out": "o"}, "job 2: field 'base' is missing"),
    ({"base": "b", "adapters": ["a"], "out": "o", "dtype": "fp8"},
     "job 2: field 'dtype': 'fp8': expected one of bfloat16, float16, float32"),
    ({"base": "b", "adapters": ["a"], "out": "o", "weights": "0.5"}, "job 2: field 'weights': '0.5': expected a list"),
    ({"base": "b", "adapters": [], "out": "o"}, "job 2: field 'adapters': []: expected a path or a non-empty list"),
    ({"base": "b", "adapters": ["a"], "out": "o", "max_memory": "lots"}, "job 2: field 'max_memory': 'lots':"),
    ({"base": "b", "adapters": ["a"], "out": "o", "rank": 8}, "job 2: unknown field 'rank'"),
    ({"base": "b", "adapters": ["a"], "out": "first"}, "job 2: writes "),
    ({"lora_run": "run", "weights": [1.0]}, "job 2: unknown field 'weights'"),
    ("b a o", "job 2: expected a mapping of fields"),
])
def test_a_bad_job_is_refused_before_any_runs(tmp_path: Path, job: object, message: str) -> None:
    done = run_batch(tmp_path, [{"base": "b", "adapter": "a", "out": "first"}, job])
    assert done.exit_code == 2
    assert done.stderr.startswith(f"lorastream: error: {tmp_path / 'jobs.yaml'}: {message}"), done.stderr
    assert len(done.stderr.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jobs.yaml"]


@pytest.mark.parametrize("document", ["jobs: [", {"jobs": []}, {"jobs": [{}], "extra": 1}, 42])
def test_a_malformed_file_is_refused(tmp_path: Path, document: object) -> None:
    path = tmp_path / "jobs.yaml"
    path.write_text(document if isinstance(document, str) else yaml.safe_dump(document))
    done = CliRunner().invoke(main, ["batch", str(path)])
    assert done.exit_code == 2 and done.stderr.startswith(f"lorastream: error: {path}: ")
