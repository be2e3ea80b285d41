"""Remote storage through fsspec, against a local S3 (moto's server on loopback): every direction of a merge
gives a local merge's bytes, an interrupted remote merge leaves no final keys and resumes, errors are one line.

Credentials and the endpoint reach s3fs the way they would in production: AWS_* environment variables.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from conftest import IN_PROCESS_BUDGET, build_case, tiny_llama

import lorastream
from lorastream.cli import main
from lorastream.io import locations as storage
from lorastream.io.remote_staging import ObjectStorePrefix
from lorastream.io.staging import MANIFEST, Staging

BUCKET = "lorastream-test"
SHARD = "60KB"  # the tiny model then spans six shards


@pytest.fixture(scope="module")
def s3(s3_server: tuple[Any, dict[str, str]]) -> Any:
    """The server's filesystem, with this module's bucket."""
    fs = s3_server[0]
    fs.mkdir(BUCKET)
    return fs


@pytest.fixture(scope="module")
def case(s3: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny Llama and a PEFT adapter, both local and uploaded, and the local merge of them."""
    root = tmp_path_factory.mktemp("remote")
    built = build_case(root, tiny_llama(), torch.bfloat16, r=4, lora_alpha=8,
                       target_modules=["q_proj", "v_proj", "down_proj"])
    s3.put(str(built.base), f"{BUCKET}/models/base", recursive=True)
    s3.put(str(built.adapter), f"{BUCKET}/models/adapter", recursive=True)
    lorastream.merge(built.base, built.adapter, root / "reference", max_shard_size=SHARD)
    return {"base": built.base, "adapter": built.adapter, "reference": root / "reference",
            "remote_base": f"s3://{BUCKET}/models/base", "remote_adapter": f"s3://{BUCKET}/models/adapter"}


def contents(files: dict[str, bytes]) -> dict[str, Any]:
    """Every file's bytes, except where a record names the inputs' paths: a shard's provenance metadata
    (its tensors' header entries and data bytes still compared exactly) and lorastream.json."""
    out: dict[str, Any] = {}
    for name, data in files.items():
        if name.endswith(".safetensors"):
            (length,) = struct.unpack("<Q", data[:8])
            header = json.loads(data[8:8 + length])
            header.pop("__metadata__")
            out[name] = (header, data[8 + length:])
        elif name == "lorastream.json":
            record = json.loads(data)
            out[name] = (record["options"], sorted(record["shards"]))
        else:
            out[name] = data
    return out


def local_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def remote_files(s3: Any, prefix: str) -> dict[str, bytes]:
    s3.invalidate_cache()
    return {key.rsplit("/", 1)[1]: s3.cat_file(key) for key in sorted(s3.find(prefix))}


def test_every_direction_matches_the_local_merge(s3: Any, case: dict[str, Any], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """remote→remote, remote→local, local→remote: the local merge's shards, index, config and companions.
    Weight files are read by ranges of at most READ_CHUNK, never whole."""
    reads: list[tuple[str, int | None, int | None]] = []
    cat_file = type(s3).cat_file

    def recording_cat_file(self: Any, path: str, start: int | None = None, end: int | None = None,
                           **kwargs: Any) -> bytes:
        reads.append((path, start, end))
        return cat_file(self, path, start=start, end=end, **kwargs)  # type: ignore[no-any-return]

    monkeypatch.setattr(type(s3), "cat_file", recording_cat_file)
    expected = contents(local_files(case["reference"]))
    runs = {"remote-remote": (case["remote_base"], case["remote_adapter"], f"s3://{BUCKET}/out/rr"),
            "remote-local": (case["remote_base"], case["remote_adapter"], str(tmp_path / "rl")),
            "local-remote": (str(case["base"]), str(case["adapter"]), f"s3://{BUCKET}/out/lr")}
    for name, (base, adapter, out) in runs.items():
        lorastream.merge(base, adapter, out, max_shard_size=SHARD)
        files = remote_files(s3, out.removeprefix("s3://")) if out.startswith("s3://") else local_files(Path(out))
        assert contents(files) == expected, name
    weight_reads = [(s, e) for path, s, e in reads if path.endswith(".safetensors")]
    assert weight_reads and all(s is not None and e is not None and 0 < e - s <= storage.READ_CHUNK
                                for s, e in weight_reads)
    assert s3.find(f"{BUCKET}/out") == sorted(f"{BUCKET}/out/{d}/{f}" for d in ("lr", "rr") for f in expected)

    report = lorastream.verify(case["remote_base"], case["remote_adapter"], f"s3://{BUCKET}/out/rr")
    assert report.ok and report.checks


def test_interrupted_remote_merge_leaves_no_final_keys_and_resumes(s3: Any, case: dict[str, Any],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    out = f"s3://{BUCKET}/resume/merged"
    staging = f"{BUCKET}/resume/.merged.lorastream-partial"
    first_shard = (case["reference"] / "model-00001-of-00006.safetensors").stat().st_size
    written = 0

    def interrupt_after_first_shard(n: int) -> None:
        nonlocal written
        written += n
        if written > 2 * first_shard:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        lorastream.merge(case["remote_base"], case["remote_adapter"], out, max_shard_size=SHARD,
                         progress=interrupt_after_first_shard)
    s3.invalidate_cache()
    assert not s3.exists(f"{BUCKET}/resume/merged"), "no final key before the merge completes"
    kept = json.loads(s3.cat_file(f"{staging}/{MANIFEST}"))["shards"]
    assert kept, "a shard was finished before the interruption"

    uploaded: list[str] = []
    real_init = storage.RemoteFile.__init__

    def recording_init(self: storage.RemoteFile, path: storage.RemotePath, size: int) -> None:
        uploaded.append(path.name)
        real_init(self, path, size)

    monkeypatch.setattr(storage.RemoteFile, "__init__", recording_init)
    lorastream.merge(case["remote_base"], case["remote_adapter"], out, max_shard_size=SHARD)
    assert uploaded and not set(uploaded) & set(kept), "finished shards are kept, not uploaded again"
    assert contents(remote_files(s3, f"{BUCKET}/resume/merged")) == contents(local_files(case["reference"]))
    assert not s3.exists(staging)


def test_a_changed_staged_shard_is_redone(s3: Any, case: dict[str, Any]) -> None:
    """The manifest's checksum (the ETag) proves a staged shard; an object rewritten since is redone."""
    staging = Staging(storage.location(f"s3://{BUCKET}/proof/.out.lorastream-partial"), "job", ObjectStorePrefix())
    s3.pipe_file(f"{BUCKET}/proof/.out.lorastream-partial/a.safetensors", b"x" * 10)
    staging.record("a.safetensors", 10, 0)
    s3.pipe_file(f"{BUCKET}/proof/.out.lorastream-partial/a.safetensors", b"y" * 10)
    resumed = Staging(staging.path, "job", ObjectStorePrefix())
    resumed.resume(overwrite=False)
    assert resumed.shards == {}
    s3.invalidate_cache()
    assert s3.ls(f"{BUCKET}/proof/.out.lorastream-partial", detail=False) == [
        f"{BUCKET}/proof/.out.lorastream-partial/{MANIFEST}"]


def test_cli_inspect_and_plan_remote(case: dict[str, Any]) -> None:
    runner = CliRunner()
    shown = runner.invoke(main, ["inspect", case["remote_base"], "--json"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["format"] == "hf-safetensors"
    one = runner.invoke(main, ["inspect", f"{case['remote_adapter']}/adapter_model.safetensors", "--json"])
    assert one.exit_code == 0 and json.loads(one.stdout)["format"] == "safetensors"

    planned = runner.invoke(main, ["plan", case["remote_base"], case["remote_adapter"], "-o",
                                   f"s3://{BUCKET}/plan/out", "--max-shard-size", SHARD])
    assert planned.exit_code == 0, planned.output
    assert "remote I/O buffers" in planned.stdout and "object store" in planned.stdout
    remote = lorastream.plan(case["remote_base"], case["remote_adapter"], f"s3://{BUCKET}/plan/out",
                             max_memory=IN_PROCESS_BUDGET)
    local = lorastream.plan(case["base"], case["adapter"], "unused-out", max_memory=IN_PROCESS_BUDGET)
    assert remote.memory.io_buffers == storage.io_buffer_bytes([remote.base.path], remote.out_dir, 5 * 10**9,
                                                               4 << 20) > 0
    assert local.memory.io_buffers == 0
    assert ((remote.memory.minimum - remote.memory.baseline) - (local.memory.minimum - local.memory.baseline)
            == remote.memory.io_buffers)


@pytest.mark.parametrize(("args", "expected"), [
    (["inspect", f"s3://{BUCKET}/models/base/missing.safetensors"], "missing.safetensors: file not found"),
    (["merge", f"s3://{BUCKET}/models/nothing-here", f"s3://{BUCKET}/models/adapter", "-o", "out"],
     "nothing-here: not a folder"),
    (["inspect", "gs://someone:hunter2@bucket/model?token=hunter2"], "gs://bucket/model: cannot open gs:// URLs"),
])
def test_remote_errors_are_one_line(case: dict[str, Any], args: list[str], expected: str) -> None:
    """A missing object or filesystem package: exit status 2, one line, no credentials from the URL."""
    done = CliRunner().invoke(main, args)
    assert done.exit_code == 2, done.output
    assert expected in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert "hunter2" not in done.output and "Traceback" not in done.output
    assert os.environ.get("AWS_SECRET_ACCESS_KEY", "") not in done.output


def test_file_urls_are_local_paths_and_urls_lose_their_secrets() -> None:
    """`file://` keeps the local fast path (a `Path`); shown URLs never carry user-info or query strings."""
    assert storage.location("file:///tmp/a%20b/model") == Path("/tmp/a b/model")
    assert storage.location("relative/folder") == Path("relative/folder")
    message = 'cannot reach "https://user:hunter2@host:9000/b/k?X-Amz-Signature=hunter2#x" now? retry'
    assert storage.redact(message) == 'cannot reach "https://host:9000/b/k" now? retry'
