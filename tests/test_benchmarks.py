"""The benchmark harness's own logic: the 7b shapes, the floor arithmetic, disk checks, README regeneration."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import floor
import make_models
import run


def test_7b_has_llama2_7b_shapes():
    spec = make_models.SPECS["7b"]
    # Llama-2-7B: 6,738,415,616 parameters (untied embeddings and head)
    assert spec.n_params() == 6_738_415_616
    linear = 4 * 4096 * 4096 + 3 * 4096 * 11008
    assert spec.merged_bytes() == 2 * 32 * linear
    assert make_models.SHARD_BYTES["7b"] == 5_000_000_000


def _ok(wall: float, rss: float = 100.0) -> dict[str, object]:
    return {"status": "ok", "median_wall_s": wall, "median_peak_rss_mib": rss, "max_peak_rss_mib": rss}


def test_ratios_floor_is_the_slower_of_copy_and_compute():
    model = {"base_bytes": 8 * 10**9, "merged_bytes": 6 * 10**9}
    tools = {"cp": _ok(4.0), "cp-sync": _ok(10.0), "lorastream": _ok(20.0, 250.0),
             "lorastream-each4": _ok(30.0, 300.0), "litgpt": _ok(40.0, 8000.0), "lorastream-litgpt": _ok(20.0)}
    r = run.ratios(tools, 512.0, model, compute_gbps=1.0)  # compute: 6 s
    assert r["floor_compute_s"] == pytest.approx(6.0)
    assert r["floor_s"] == pytest.approx(6.0)  # compute is slower than cp -r
    assert r["floor_durable_s"] == pytest.approx(10.0)  # cp -r + sync is slower than compute
    assert r["lorastream_over_floor_time"] == pytest.approx(20.0 / 6.0)
    assert r["lorastream_gbps"] == pytest.approx(0.4)
    assert r["each4_over_lorastream_time"] == pytest.approx(1.5)
    assert r["lorastream_litgpt_over_litgpt_time"] == pytest.approx(0.5)
    assert r["litgpt_over_lorastream_litgpt_rss"] == pytest.approx(80.0)
    # without the I/O part there is no floor
    assert run.ratios({"lorastream": _ok(20.0)}, 512.0, model, 1.0)["floor_s"] is None


def test_run_once_skips_an_output_that_does_not_fit(tmp_path: Path):
    out = tmp_path / "out"
    sidecar = tmp_path / ".out.lorastream-partial"
    sidecar.mkdir()
    tool = run.Tool("cp", ["cp", "-r", str(tmp_path), str(out)], [], out, output_bytes=10**18)
    result = run.run_once(tool, tmp_path / "log", timeout=10)
    assert result.error is not None and result.error.startswith("skipped: its output needs")
    assert not sidecar.exists()  # a failed lorastream run's leftovers are removed before the next run


def test_update_readme_replaces_only_the_marked_section(tmp_path: Path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nbefore\n{run.README_START}\n\nold table\n\n{run.README_END}\nafter\n")
    run.update_readme(readme, "# lorastream merge benchmark\n\nmeta line\n\n## 2gb: 1B params\n\n| new |\n")
    text = readme.read_text()
    assert "old table" not in text
    assert text.startswith("# Title\n\nbefore\n" + run.README_START)
    assert "### 2gb: 1B params" in text and "| new |" in text and "# lorastream merge benchmark" not in text
    assert text.endswith(run.README_END + "\nafter\n")


def test_floor_measures_the_engine_kernel_in_blocks():
    result = floor.compute_floor(rows=1024, cols=2048, repeats=1)
    assert result["block_rows"] == 512  # the planner's largest block, 2^20 elements
    for name in ("naive", "blocked", "decode", "delta", "check", "encode"):
        assert result[f"{name}_s"] > 0
        assert result[f"{name}_gbps"] == pytest.approx(result["weight_gb"] / result[f"{name}_s"])


def test_qlora_cases_and_their_ratios(tmp_path: Path):
    """The seed's case: the QLoRA run merged by LitGPT, by lorastream as training saw it and to NF4; and the
    quantized paths' times over the dense merge."""
    dirs = {key: str(tmp_path / key) for key in ("hf_base", "peft_adapter", "litgpt_base", "litgpt_lora",
                                                 "peft_adapter_2", "peft_adapter_3", "peft_adapter_4", "hf_nf4",
                                                 "litgpt_qlora")}
    paths = run.Paths(Path("python"), Path("lorastream"), Path("litgpt"))
    tools = run.tools_for("7b", {"dirs": dirs, "base_bytes": 3 * 10**9}, tmp_path / "out", paths, "512MiB")
    qlora = dirs["litgpt_qlora"]
    assert tools["litgpt-qlora"].argv == ["litgpt", "merge_lora", qlora]
    assert tools["lorastream-qlora"].argv[:3] == ["lorastream", "merge", qlora]
    assert "--trained-on" in tools["lorastream-qlora"].argv
    command = tools["lorastream-qlora-nf4"].argv
    assert command[command.index("--format") + 1] == "hf" and command[command.index("--quantize") + 1] == "nf4"
    command = tools["lorastream-to-nf4"].argv
    assert command[2] == dirs["hf_base"] and command[command.index("--quantize") + 1] == "nf4"
    assert set(run.NF4_TOOLS) <= set(tools)
    r = run.ratios({"lorastream": _ok(10.0), "lorastream-nf4": _ok(12.0), "lorastream-to-nf4": _ok(14.0),
                    "litgpt-qlora": _ok(40.0), "lorastream-qlora": _ok(20.0), "lorastream-qlora-nf4": _ok(16.0),
                    "peft-nf4": _ok(32.0)}, 512.0, {"base_bytes": 10**9, "merged_bytes": 10**9}, None)
    assert r["lorastream_nf4_over_lorastream_time"] == pytest.approx(1.2)
    assert r["lorastream_to_nf4_over_lorastream_time"] == pytest.approx(1.4)
    assert r["lorastream_qlora_over_litgpt_qlora_time"] == pytest.approx(0.5)
    assert r["lorastream_qlora_nf4_over_peft_nf4_time"] == pytest.approx(0.5)
