"""Benchmark ``lorastream merge`` against ``cp -r``, PEFT and ``litgpt merge_lora``, and on an NF4 base against PEFT.

For every size it builds the synthetic models if absent (``make_models.py``, in a separate process so its
memory is gone before timing starts), then runs each tool ``--repeats`` times, interleaved (one run of every
tool per round), each under ``/usr/bin/time -v`` in a fresh process. Before every run the previous output is
removed, ``sync`` is called, and the tool's inputs are read once with ``cat > /dev/null`` so every tool starts
from a warm page cache; none of that is timed. Wall time and peak RSS come from GNU time's "Elapsed (wall
clock) time" and "Maximum resident set size".

``lorastream-litgpt`` merges the LitGPT run that ``litgpt merge_lora`` merges, side by side with it;
``lorastream-each4`` writes four merged models (the adapter and three more like it) in one pass with
``--each``, to compare with the single merge. The compute floor of the merge arithmetic (``floor.py``) is
measured once, before the runs; with ``cp -r``'s time as the I/O floor it tells how close lorastream gets to
what the machine allows. A run whose output would not fit on the disk is skipped, and reported so.

The NF4 case (tools ``lorastream-nf4`` and ``peft-nf4``) merges the same adapter into ``hf-nf4/``, the base
quantized to bitsandbytes NF4 by transformers (built on first use, only when one of these tools is selected),
and writes a dense bf16 model: lorastream within ``--max-memory``, PEFT by loading, dequantizing and merging.

Writes ``results.json``, ``results.md`` and ``results.png`` into ``--results-dir`` (default: this folder).

    .venv/bin/python benchmarks/run.py --sizes 2gb,8gb --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TIME_BIN = Path("/usr/bin/time")
MIB = 1024 * 1024
TOOLS = ("cp", "cp-sync", "lorastream", "peft", "litgpt", "lorastream-litgpt", "lorastream-each4", "lorastream-nf4",
         "peft-nf4", "lorastream-to-nf4", "litgpt-qlora", "lorastream-qlora", "lorastream-qlora-nf4")
TOOL_LABELS = {"cp": "cp -r", "cp-sync": "cp -r + sync", "lorastream": "lorastream", "peft": "PEFT",
               "litgpt": "LitGPT", "lorastream-litgpt": "lorastream LitGPT",
               "lorastream-each4": "lorastream x4 (--each)", "lorastream-nf4": "lorastream NF4", "peft-nf4": "PEFT NF4",
               "lorastream-to-nf4": "lorastream --quantize nf4", "litgpt-qlora": "LitGPT QLoRA run",
               "lorastream-qlora": "lorastream QLoRA run", "lorastream-qlora-nf4": "lorastream QLoRA run -> NF4"}
SIZES = ("tiny", "2gb", "8gb", "7b")
# Adapters merged by lorastream-each4: the one every other tool merges, then make_models.py's three extra ones.
EACH_ADAPTERS = ("peft_adapter", "peft_adapter_2", "peft_adapter_3", "peft_adapter_4")
# Free disk kept beyond a run's expected output before it is started.
DISK_MARGIN = 2 * 10**9
# The README section run.py --readme regenerates, between these two lines.
README_START = "<!-- benchmark results: written by benchmarks/run.py --readme README.md -->"
README_END = "<!-- end of benchmark results -->"
# Tools of the NF4 build (hf-nf4/ and litgpt-qlora/, built only when one of them is selected).
NF4_TOOLS = ("lorastream-nf4", "peft-nf4", "litgpt-qlora", "lorastream-qlora", "lorastream-qlora-nf4")
# Tools that read or write bitsandbytes 4-bit (their own lines in the results).
QUANTIZED_TOOLS = (*NF4_TOOLS, "lorastream-to-nf4")
# Child processes must never try to reach a model hub (there is no network here; they would hang on retries).
CHILD_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@dataclass
class Paths:
    """Executables used by the benchmark."""

    python: Path
    lorastream: Path
    litgpt: Path


@dataclass
class Tool:
    """One benchmarked command: how to run it, what it reads, and what it writes."""

    name: str
    argv: list[str]
    inputs: list[Path]
    output: Path
    output_bytes: int = 0  # expected size of the output, to check the free disk before running


@dataclass
class RunResult:
    """Measurements of one timed run."""

    exit_status: int
    wall_s: float | None = None
    peak_rss_kib: int | None = None
    user_s: float | None = None
    sys_s: float | None = None
    output_bytes: int | None = None
    error: str | None = None
    logs: dict[str, str] = field(default_factory=dict)


def parse_size(text: str) -> int:
    """Parse a byte size such as ``512MiB``, ``2GB`` or ``1048576`` into bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    powers = {"K": 1, "M": 2, "G": 3, "T": 4}
    if unit == "B":
        return int(number)
    base = 1024 if "I" in unit else 1000
    return int(number * base ** powers[unit[0]])


def parse_elapsed(text: str) -> float:
    """Parse GNU time's ``h:mm:ss`` or ``m:ss.ss`` elapsed time into seconds."""
    seconds = 0.0
    for part in text.strip().split(":"):
        seconds = seconds * 60 + float(part)
    return seconds


def parse_time_report(text: str) -> dict[str, float]:
    """Pick wall time, peak RSS, CPU times and exit status out of a ``/usr/bin/time -v`` report."""
    fields: dict[str, float] = {}
    for line in text.splitlines():
        key, _, value = line.strip().rpartition(": ")
        if key.startswith("Elapsed (wall clock) time"):
            fields["wall_s"] = parse_elapsed(value)
        elif key == "Maximum resident set size (kbytes)":
            fields["peak_rss_kib"] = int(value)
        elif key == "User time (seconds)":
            fields["user_s"] = float(value)
        elif key == "System time (seconds)":
            fields["sys_s"] = float(value)
        elif key == "Exit status":
            fields["exit_status"] = int(value)
    return fields


def last_line(path: Path) -> str:
    """The last non-empty line of a log file (progress-bar carriage returns split lines too)."""
    if not path.is_file():
        return ""
    lines = [ln.strip() for ln in re.split(r"[\r\n]+", path.read_text(errors="replace")) if ln.strip()]
    return lines[-1] if lines else ""


def tree_bytes(path: Path) -> int:
    """Total size of a file or of every file under a folder."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def remove(path: Path) -> None:
    """Remove a file or folder if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def remove_output(path: Path) -> None:
    """Remove a tool's output and any hidden sidecar beside it (``.OUT.lorastream-partial`` and ``.lock`` from a
    lorastream run that failed or was killed), so no run leaves disk behind."""
    for sidecar in path.parent.glob(f".{path.name}.*"):
        remove(sidecar)
    remove(path)


def warm_page_cache(paths: list[Path]) -> None:
    """Read every file under ``paths`` once (``cat > /dev/null``), so a timed run starts from a warm cache."""
    files = sorted(str(f) for p in paths for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())
    if files:
        subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)


def tools_for(size: str, model: dict[str, Any], out_root: Path, paths: Paths, budget: str) -> dict[str, Tool]:
    """The commands benchmarked on one size's models (``model``: its manifest)."""
    dirs = model["dirs"]
    hf_base, adapter = Path(dirs["hf_base"]), Path(dirs["peft_adapter"])
    litgpt_base, litgpt_lora = Path(dirs["litgpt_base"]), Path(dirs["litgpt_lora"])
    each = [Path(dirs[key]) for key in EACH_ADAPTERS]
    out = {name: out_root / f"{size}-{name}" for name in TOOLS if name not in ("litgpt", "litgpt-qlora")}
    tools = {
        "cp": Tool("cp", ["cp", "-r", str(hf_base), str(out["cp"])], [hf_base], out["cp"]),
        # The copy made durable, as lorastream's output is (it fsyncs every shard): sync FILE... fsyncs each.
        "cp-sync": Tool("cp-sync", ["sh", "-c", 'cp -r "$0" "$1" && sync "$1"/*', str(hf_base), str(out["cp-sync"])],
                        [hf_base], out["cp-sync"]),
        "lorastream": Tool(
            "lorastream",
            [str(paths.lorastream), "merge", str(hf_base), str(adapter), "-o", str(out["lorastream"]),
             "--max-memory", budget],
            [hf_base, adapter],
            out["lorastream"],
        ),
        "peft": Tool(
            "peft",
            [str(paths.python), str(HERE / "peft_merge.py"), str(hf_base), str(adapter), str(out["peft"])],
            [hf_base, adapter],
            out["peft"],
        ),
        # litgpt merge_lora writes lit_model.pth next to lit_model.pth.lora and skips the merge if it exists.
        "litgpt": Tool(
            "litgpt",
            [str(paths.litgpt), "merge_lora", str(litgpt_lora)],
            [litgpt_base / "lit_model.pth", litgpt_lora],
            litgpt_lora / "lit_model.pth",
        ),
        # The same run; the base comes from its hyperparameters.yaml (checkpoint_dir), as for litgpt.
        "lorastream-litgpt": Tool(
            "lorastream-litgpt",
            [str(paths.lorastream), "merge", str(litgpt_lora), "-o", str(out["lorastream-litgpt"]),
             "--max-memory", budget],
            [litgpt_base / "lit_model.pth", litgpt_lora],
            out["lorastream-litgpt"],
        ),
        "lorastream-each4": Tool(
            "lorastream-each4",
            [str(paths.lorastream), "merge", str(hf_base), "--each", *map(str, each), "-o",
             str(out["lorastream-each4"]), "--max-memory", budget],
            [hf_base, *each],
            out["lorastream-each4"],
            output_bytes=len(each) * model["base_bytes"],
        ),
    }
    # The QLoRA user's other output: the merge quantized again (NF4 with double quantization).
    tools["lorastream-to-nf4"] = Tool(
        "lorastream-to-nf4",
        [str(paths.lorastream), "merge", str(hf_base), str(adapter), "-o", str(out["lorastream-to-nf4"]),
         "--quantize", "nf4", "--max-memory", budget],
        [hf_base, adapter],
        out["lorastream-to-nf4"],
        output_bytes=model["base_bytes"] // 3,
    )
    if "litgpt_qlora" in dirs:
        qlora = Path(dirs["litgpt_qlora"])
        lit_inputs = [litgpt_base / "lit_model.pth", qlora]
        # LitGPT merges a QLoRA run into the dense base, as it merges any run.
        tools["litgpt-qlora"] = Tool("litgpt-qlora", [str(paths.litgpt), "merge_lora", str(qlora)], lit_inputs,
                                     qlora / "lit_model.pth")
        # lorastream merges it into the base as training saw it, dequantize(quantize(W)) (dense lit_model.pth) ...
        tools["lorastream-qlora"] = Tool(
            "lorastream-qlora",
            [str(paths.lorastream), "merge", str(qlora), "-o", str(out["lorastream-qlora"]), "--trained-on", "nf4",
             "--max-memory", budget],
            lit_inputs,
            out["lorastream-qlora"],
        )
        # ... or writes the merge as an NF4 Hugging Face checkpoint.
        tools["lorastream-qlora-nf4"] = Tool(
            "lorastream-qlora-nf4",
            [str(paths.lorastream), "merge", str(qlora), "-o", str(out["lorastream-qlora-nf4"]), "--format", "hf",
             "--quantize", "nf4", "--max-memory", budget],
            lit_inputs,
            out["lorastream-qlora-nf4"],
            output_bytes=model["base_bytes"] // 3,
        )
    if "hf_nf4" in dirs:
        hf_nf4 = Path(dirs["hf_nf4"])
        # Both read the NF4 checkpoint and write a dense bf16 model.
        tools["lorastream-nf4"] = Tool(
            "lorastream-nf4",
            [str(paths.lorastream), "merge", str(hf_nf4), str(adapter), "-o", str(out["lorastream-nf4"]),
             "--max-memory", budget],
            [hf_nf4, adapter],
            out["lorastream-nf4"],
        )
        tools["peft-nf4"] = Tool(
            "peft-nf4",
            [str(paths.python), str(HERE / "peft_merge.py"), "--quantized", str(hf_nf4), str(adapter),
             str(out["peft-nf4"])],
            [hf_nf4, adapter],
            out["peft-nf4"],
        )
    for tool in tools.values():  # every output but --each's is one model
        tool.output_bytes = tool.output_bytes or model["base_bytes"]
    return tools


def run_once(tool: Tool, log_stem: Path, timeout: float | None) -> RunResult:
    """Run ``tool`` once under ``/usr/bin/time -v`` from a clean output and a warm cache; skip it (as failed) if
    its output would leave less than ``DISK_MARGIN`` free."""
    remove_output(tool.output)
    free = shutil.disk_usage(tool.output.parent).free
    if free < tool.output_bytes + DISK_MARGIN:
        return RunResult(exit_status=-1, error=f"skipped: its output needs {tool.output_bytes / 1e9:.1f} GB (+ "
                         f"{DISK_MARGIN / 1e9:.0f} GB margin) of disk, {free / 1e9:.1f} GB is free")
    subprocess.run(["sync"], check=False)
    warm_page_cache(tool.inputs)
    logs = {k: str(log_stem.with_suffix(f".{k}")) for k in ("stdout", "stderr", "time")}
    env = {**os.environ, **CHILD_ENV}
    with open(logs["stdout"], "wb") as out, open(logs["stderr"], "wb") as err:
        proc = subprocess.Popen(
            [str(TIME_BIN), "-v", "-o", logs["time"], *tool.argv],
            stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env, cwd=log_stem.parent,
            start_new_session=True,
        )
        try:
            status = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            remove_output(tool.output)
            return RunResult(exit_status=-signal.SIGKILL, error=f"timed out after {timeout:g} s", logs=logs)
    report = Path(logs["time"]).read_text(errors="replace") if Path(logs["time"]).is_file() else ""
    fields = parse_time_report(report)
    result = RunResult(
        exit_status=status,
        wall_s=fields.get("wall_s"),
        peak_rss_kib=int(fields["peak_rss_kib"]) if "peak_rss_kib" in fields else None,
        user_s=fields.get("user_s"),
        sys_s=fields.get("sys_s"),
        logs=logs,
    )
    if status != 0:
        killed = re.search(r"Command terminated by signal \d+", report)
        why = killed.group(0) if killed else last_line(Path(logs["stderr"]))
        result.error = why or f"exit status {status}, nothing on stderr"
    elif not tool.output.exists():
        result.error = f"exited 0 but wrote no {tool.output}"
    else:
        result.output_bytes = tree_bytes(tool.output)
    remove_output(tool.output)
    return result


def summarize(runs: list[RunResult], argv: list[str]) -> dict[str, Any]:
    """Medians over the runs of one tool, or the failure that stopped it."""
    summary: dict[str, Any] = {"command": argv, "runs": [vars(r) for r in runs]}
    failed = [r for r in runs if r.error]
    if failed or not runs:
        bad = failed[0] if failed else RunResult(exit_status=-1, error="not run")
        skipped = bool(bad.error and bad.error.startswith("skipped"))
        summary.update(status="skipped" if skipped else "failed", exit_status=bad.exit_status, error=bad.error)
        return summary
    walls = [r.wall_s for r in runs if r.wall_s is not None]
    rss = [r.peak_rss_kib / 1024 for r in runs if r.peak_rss_kib is not None]
    summary.update(
        status="ok",
        median_wall_s=statistics.median(walls) if walls else None,
        min_wall_s=min(walls, default=None),
        max_wall_s=max(walls, default=None),
        median_peak_rss_mib=statistics.median(rss) if rss else None,
        max_peak_rss_mib=max(rss, default=None),
        output_bytes=runs[-1].output_bytes,
    )
    return summary


def ratios(tools: dict[str, dict[str, Any]], budget_mib: float, model: dict[str, Any],
           compute_gbps: float | None) -> dict[str, float | None]:
    """lorastream's time relative to each peer and its peak RSS relative to the memory budget (and the same for
    the LitGPT, multi-output and NF4 cases), and its time relative to the floor: the slower of copying the base
    (``cp -r``'s time) and merging its adapted weights at ``compute_gbps`` (``floor.py``'s blocked merge)."""

    def value(name: str, key: str) -> float | None:
        entry = tools.get(name, {})
        return entry.get(key) if entry.get("status") == "ok" else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    ls_time = value("lorastream", "median_wall_s")
    ls_rss = value("lorastream", "median_peak_rss_mib")
    nf4_rss = value("lorastream-nf4", "median_peak_rss_mib")
    lit_rss = value("lorastream-litgpt", "median_peak_rss_mib")
    each_rss = value("lorastream-each4", "median_peak_rss_mib")
    floor_io = value("cp", "median_wall_s")
    floor_durable_io = value("cp-sync", "median_wall_s")
    floor_compute = model["merged_bytes"] / 1e9 / compute_gbps if compute_gbps else None
    # no floor without its I/O part: the arithmetic alone is never the whole job
    floor = max(floor_io, floor_compute or 0.0) if floor_io else None
    floor_durable = max(floor_durable_io, floor_compute or 0.0) if floor_durable_io else None
    return {
        "lorastream_over_peft_time": ratio(ls_time, value("peft", "median_wall_s")),
        "lorastream_over_cp_time": ratio(ls_time, value("cp", "median_wall_s")),
        "lorastream_over_litgpt_time": ratio(ls_time, value("litgpt", "median_wall_s")),
        "lorastream_peak_rss_mib": ls_rss,
        "budget_mib": budget_mib,
        "lorastream_rss_over_budget": ratio(ls_rss, budget_mib),
        "peft_over_lorastream_rss": ratio(value("peft", "median_peak_rss_mib"), ls_rss),
        "lorastream_nf4_over_peft_nf4_time": ratio(value("lorastream-nf4", "median_wall_s"),
                                                   value("peft-nf4", "median_wall_s")),
        "lorastream_nf4_peak_rss_mib": nf4_rss,
        "lorastream_nf4_max_peak_rss_mib": value("lorastream-nf4", "max_peak_rss_mib"),
        "lorastream_nf4_rss_over_budget": ratio(nf4_rss, budget_mib),
        "peft_nf4_peak_rss_mib": value("peft-nf4", "median_peak_rss_mib"),
        "peft_nf4_over_lorastream_nf4_rss": ratio(value("peft-nf4", "median_peak_rss_mib"), nf4_rss),
        "lorastream_nf4_over_lorastream_time": ratio(value("lorastream-nf4", "median_wall_s"), ls_time),
        "lorastream_to_nf4_over_lorastream_time": ratio(value("lorastream-to-nf4", "median_wall_s"), ls_time),
        "lorastream_to_nf4_peak_rss_mib": value("lorastream-to-nf4", "median_peak_rss_mib"),
        "lorastream_to_nf4_max_peak_rss_mib": value("lorastream-to-nf4", "max_peak_rss_mib"),
        "lorastream_qlora_over_litgpt_qlora_time": ratio(value("lorastream-qlora", "median_wall_s"),
                                                         value("litgpt-qlora", "median_wall_s")),
        "lorastream_qlora_nf4_over_peft_nf4_time": ratio(value("lorastream-qlora-nf4", "median_wall_s"),
                                                         value("peft-nf4", "median_wall_s")),
        "lorastream_qlora_peak_rss_mib": value("lorastream-qlora", "median_peak_rss_mib"),
        "lorastream_qlora_nf4_peak_rss_mib": value("lorastream-qlora-nf4", "median_peak_rss_mib"),
        "litgpt_qlora_peak_rss_mib": value("litgpt-qlora", "median_peak_rss_mib"),
        "lorastream_litgpt_over_litgpt_time": ratio(value("lorastream-litgpt", "median_wall_s"),
                                                    value("litgpt", "median_wall_s")),
        "lorastream_litgpt_peak_rss_mib": lit_rss,
        "lorastream_litgpt_rss_over_budget": ratio(lit_rss, budget_mib),
        "litgpt_over_lorastream_litgpt_rss": ratio(value("litgpt", "median_peak_rss_mib"), lit_rss),
        "each4_over_lorastream_time": ratio(value("lorastream-each4", "median_wall_s"), ls_time),
        "each4_peak_rss_mib": each_rss,
        "each4_rss_over_budget": ratio(each_rss, budget_mib),
        "floor_io_s": floor_io,
        "floor_durable_io_s": floor_durable_io,
        "floor_compute_s": floor_compute,
        "floor_s": floor,
        "floor_durable_s": floor_durable,
        "lorastream_gbps": ratio(model["base_bytes"] / 1e9, ls_time),
        "lorastream_over_floor_time": ratio(ls_time, floor),
        "lorastream_over_durable_floor_time": ratio(ls_time, floor_durable),
        "lorastream_over_cp_sync_time": ratio(ls_time, floor_durable_io),
    }


def build_models(size: str, workdir: Path, python: Path, nf4: bool = False) -> dict[str, Any]:
    """Build one size's models in a separate process (so their memory is freed) and return the manifest.

    With ``nf4``, ``hf-nf4/`` and ``litgpt-qlora/`` are built too if absent (an existing base build is kept as
    it is); their manifest (``nf4-manifest.json``) goes under ``"nf4"`` and their folders under ``dirs``.
    """
    manifest = workdir / size / "manifest.json"
    nf4_manifest = workdir / size / "nf4-manifest.json"
    # Always run: it returns at once for a complete build, and adds what an older build lacks.
    subprocess.run(
        [str(python), str(HERE / "make_models.py"), "--sizes", size, "--workdir", str(workdir),
         *(["--nf4"] if nf4 else [])],
        check=True, env={**os.environ, **CHILD_ENV},
    )
    model = json.loads(manifest.read_text())
    if nf4:
        model["nf4"] = json.loads(nf4_manifest.read_text())
        model["dirs"]["hf_nf4"] = model["nf4"]["dir"]
        model["dirs"]["litgpt_qlora"] = model["nf4"]["litgpt_qlora"]
    return model


def measure_floor(python: Path) -> dict[str, Any]:
    """``floor.py``'s compute floor (in a separate process, like every timed tool); empty if it fails."""
    text = capture([str(python), str(HERE / "floor.py"), "--json"])
    return json.loads(text.splitlines()[-1]) if text else {}


def capture(argv: list[str]) -> str:
    """stdout of a short command, or an empty string if it fails."""
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=True,
                              env={**os.environ, **CHILD_ENV}).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def versions(python: Path, packages: list[str]) -> dict[str, str]:
    """Installed versions of ``packages`` in the environment of ``python``."""
    code = (
        "import importlib.metadata as m, json, sys\n"
        "out = {}\n"
        "for p in sys.argv[1:]:\n"
        "    try: out[p] = m.version(p)\n"
        "    except m.PackageNotFoundError: out[p] = None\n"
        "print(json.dumps(out))\n"
    )
    text = capture([str(python), "-c", code, *packages])
    return json.loads(text.splitlines()[-1]) if text else {}


def machine_info(paths: Paths) -> dict[str, Any]:
    """Where and with what the benchmark ran."""
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    mem_kib = next(int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines()
                   if ln.startswith("MemTotal:"))
    litgpt_python = paths.litgpt.parent / "python"
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "mem_gib": round(mem_kib / MIB, 1),
        "versions": {
            "main": versions(paths.python, ["lorastream", "torch", "transformers", "peft", "safetensors",
                                            "bitsandbytes"]),
            "litgpt": versions(litgpt_python, ["litgpt", "torch", "lightning"]),
        },
    }


def fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    """Format a number for the markdown table; ``-`` for missing values."""
    return "-" if value is None else f"{value:{spec}}{suffix}"


def write_markdown(results: dict[str, Any], path: Path) -> None:
    """Write the results as markdown tables."""
    meta = results["meta"]
    lines = [
        "# lorastream merge benchmark",
        "",
        f"{meta['date']}; {meta['cpu']}, {meta['cpus']} CPUs, {meta['mem_gib']} GiB RAM; "
        f"repeats: {results['repeats']} (medians shown); lorastream `--max-memory {results['budget']}`; "
        "warm page cache; wall time and peak RSS from `/usr/bin/time -v`.",
        "",
    ]
    compute = results.get("floor", {}).get("compute")
    if compute:
        lines += [
            f"Compute floor (`benchmarks/floor.py`, {compute['threads']} threads): merging a rank-{compute['rank']} "
            f"LoRA into a {compute['rows']}x{compute['cols']} bf16 weight runs at {compute['blocked_gbps']:.2f} GB/s "
            f"in row blocks with the engine's kernel ({compute['naive_gbps']:.2f} GB/s as one whole-tensor fp32 "
            "merge). A size's floor is the slower of `cp -r` (the I/O floor) and its adapted weights at that rate.",
            "",
        ]
    for size, entry in results["sizes"].items():
        model = entry["model"]
        spec = model["spec"]
        lines += [
            f"## {size}: {model['n_params'] / 1e9:.2f}B params, {model['base_bytes'] / 1e9:.2f} GB bf16",
            "",
            f"hidden {spec['hidden']}, intermediate {spec['intermediate']}, {spec['layers']} layers, "
            f"{spec['heads']} heads / {spec['kv_heads']} kv heads, vocab {spec['vocab']}; "
            f"LoRA r={model['lora_r']}, alpha={model['lora_alpha']} on all 7 projections."
            + (f" NF4 base (`NF4` rows): {model['nf4']['nf4_bytes'] / 1e9:.2f} GB, bitsandbytes NF4 with double "
               "quantization, made by transformers; output dense bf16." if "nf4" in model else ""),
            "",
            "| tool | status | wall time (s) | min-max (s) | peak RSS (MiB) | output (GB) |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for name, tool in entry["tools"].items():
            label = TOOL_LABELS.get(name, name)
            if tool["status"] != "ok":
                error = str(tool.get("error", "")).replace("|", "\\|")[:160]
                status = error if tool["status"] == "skipped" else f"failed (exit {tool['exit_status']}): {error}"
                lines.append(f"| {label} | {status} | - | - | - | - |")
                continue
            out_gb = tool["output_bytes"] / 1e9 if tool.get("output_bytes") is not None else None
            lines.append(
                f"| {label} | ok | {fmt(tool['median_wall_s'])} | "
                f"{fmt(tool['min_wall_s'])}-{fmt(tool['max_wall_s'])} | "
                f"{fmt(tool['median_peak_rss_mib'], '.0f')} | {fmt(out_gb, '.2f')} |"
            )
        r = entry["ratios"]
        lines.append("")
        if set(entry["tools"]) - set(QUANTIZED_TOOLS):
            lines += [
                f"- lorastream / PEFT wall time: {fmt(r['lorastream_over_peft_time'], '.2f', 'x')}",
                f"- lorastream / cp -r wall time: {fmt(r['lorastream_over_cp_time'], '.2f', 'x')}",
                f"- lorastream / LitGPT wall time: {fmt(r['lorastream_over_litgpt_time'], '.2f', 'x')}",
                f"- lorastream peak RSS: {fmt(r['lorastream_peak_rss_mib'], '.0f')} MiB of a "
                f"{fmt(r['budget_mib'], '.0f')} MiB budget ({fmt(r['lorastream_rss_over_budget'], '.2f', 'x')}); "
                f"PEFT uses {fmt(r['peft_over_lorastream_rss'], '.1f', 'x')} as much",
                f"- lorastream throughput: {fmt(r['lorastream_gbps'], '.2f', ' GB/s')}; floor: max(cp -r "
                f"{fmt(r['floor_io_s'], '.2f', ' s')}, compute {fmt(r['floor_compute_s'], '.2f', ' s')}) = "
                f"{fmt(r['floor_s'], '.2f', ' s')}; lorastream takes "
                f"{fmt(r['lorastream_over_floor_time'], '.2f', 'x')} the floor",
                f"- durable floor (the output on disk, as lorastream leaves it): max(cp -r + sync "
                f"{fmt(r['floor_durable_io_s'], '.2f', ' s')}, compute {fmt(r['floor_compute_s'], '.2f', ' s')}) = "
                f"{fmt(r['floor_durable_s'], '.2f', ' s')}; lorastream takes "
                f"{fmt(r['lorastream_over_durable_floor_time'], '.2f', 'x')} it",
            ]
        if "lorastream-litgpt" in entry["tools"]:
            lines += [
                f"- LitGPT run: lorastream / `litgpt merge_lora` wall time: "
                f"{fmt(r['lorastream_litgpt_over_litgpt_time'], '.2f', 'x')}; lorastream peak RSS "
                f"{fmt(r['lorastream_litgpt_peak_rss_mib'], '.0f')} MiB "
                f"({fmt(r['lorastream_litgpt_rss_over_budget'], '.2f', 'x')} the budget); LitGPT uses "
                f"{fmt(r['litgpt_over_lorastream_litgpt_rss'], '.1f', 'x')} as much",
            ]
        if "lorastream-each4" in entry["tools"]:
            lines += [
                f"- `--each` with 4 adapters (4 outputs, one pass) / one lorastream merge, wall time: "
                f"{fmt(r['each4_over_lorastream_time'], '.2f', 'x')} (4 separate merges: 4x); peak RSS "
                f"{fmt(r['each4_peak_rss_mib'], '.0f')} MiB ({fmt(r['each4_rss_over_budget'], '.2f', 'x')} the budget)",
            ]
        if set(entry["tools"]) & set(NF4_TOOLS):
            worst = r["lorastream_nf4_max_peak_rss_mib"]
            verdict = ("" if worst is None else
                       "; every run within the budget" if worst <= r["budget_mib"] else
                       f"; OVER the budget (worst run {worst:.0f} MiB)")
            lines += [
                f"- NF4: lorastream / PEFT wall time: {fmt(r['lorastream_nf4_over_peft_nf4_time'], '.2f', 'x')}",
                f"- NF4: lorastream peak RSS: {fmt(r['lorastream_nf4_peak_rss_mib'], '.0f')} MiB of a "
                f"{fmt(r['budget_mib'], '.0f')} MiB budget ({fmt(r['lorastream_nf4_rss_over_budget'], '.2f', 'x')})"
                f"{verdict}; PEFT: {fmt(r['peft_nf4_peak_rss_mib'], '.0f')} MiB, "
                f"{fmt(r['peft_nf4_over_lorastream_nf4_rss'], '.1f', 'x')} as much",
                f"- NF4 base -> dense / the dense merge (lorastream), wall time: "
                f"{fmt(r['lorastream_nf4_over_lorastream_time'], '.2f', 'x')}",
            ]
        if "lorastream-to-nf4" in entry["tools"]:
            lines += [
                f"- `--quantize nf4` (double quant) / the dense merge (lorastream), wall time: "
                f"{fmt(r['lorastream_to_nf4_over_lorastream_time'], '.2f', 'x')}; peak RSS "
                f"{fmt(r['lorastream_to_nf4_peak_rss_mib'], '.0f')} MiB (worst run "
                f"{fmt(r['lorastream_to_nf4_max_peak_rss_mib'], '.0f')} MiB)",
            ]
        if {"lorastream-qlora", "lorastream-qlora-nf4"} & set(entry["tools"]):
            lines += [
                f"- LitGPT QLoRA run (`quantize: bnb.nf4`): lorastream `--trained-on nf4` / `litgpt merge_lora` "
                f"wall time: {fmt(r['lorastream_qlora_over_litgpt_qlora_time'], '.2f', 'x')}; lorastream to NF4 "
                f"(`--format hf --quantize nf4`) / PEFT's dequantize route: "
                f"{fmt(r['lorastream_qlora_nf4_over_peft_nf4_time'], '.2f', 'x')}; peak RSS "
                f"{fmt(r['lorastream_qlora_peak_rss_mib'], '.0f')} / "
                f"{fmt(r['lorastream_qlora_nf4_peak_rss_mib'], '.0f')} MiB, "
                f"LitGPT {fmt(r['litgpt_qlora_peak_rss_mib'], '.0f')} MiB",
            ]
        lines.append("")
    path.write_text("\n".join(lines))


def update_readme(readme: Path, markdown: str) -> None:
    """Replace the lines between README_START and README_END with ``results.md`` less its title, its headings
    one level down (they sit under the README's "Benchmarks" section)."""
    lines = readme.read_text().splitlines()
    start, end = lines.index(README_START), lines.index(README_END)
    body = [("#" + ln if ln.startswith("## ") else ln) for ln in markdown.splitlines() if not ln.startswith("# ")]
    readme.write_text("\n".join([*lines[: start + 1], "", *body, "", *lines[end:]]) + "\n")


def write_plot(results: dict[str, Any], path: Path) -> bool:
    """Two panels (wall time, peak RSS) of grouped bars per size and tool; False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed; skipping the plot", file=sys.stderr)
        return False
    sizes = list(results["sizes"])
    names = [n for n in TOOLS if any(n in results["sizes"][s]["tools"] for s in sizes)]
    width = 0.8 / max(len(names), 1)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    panels: list[tuple[Any, str, str, Callable[[float], str]]] = [
        (axes[0], "median_wall_s", "wall time (s)", lambda v: f"{v:.1f}"),
        (axes[1], "median_peak_rss_mib", "peak RSS (MiB, log scale)", lambda v: f"{v:.0f}"),
    ]
    for ax, key, label, text in panels:
        for i, name in enumerate(names):
            xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(sizes))]
            for x, size in zip(xs, sizes, strict=True):
                tool = results["sizes"][size]["tools"].get(name)
                if tool is None:
                    continue
                if tool["status"] != "ok" or tool.get(key) is None:
                    ax.text(x, 0.02, tool["status"], rotation=90, ha="center", va="bottom", fontsize=8,
                            color="red", transform=ax.get_xaxis_transform())
                    continue
                ax.bar(x, tool[key], width, color=f"C{TOOLS.index(name)}", label=TOOL_LABELS[name],
                       hatch="//" if name in QUANTIZED_TOOLS else None,
                       edgecolor="white" if name in QUANTIZED_TOOLS else None)
                ax.annotate(text(tool[key]), (x, tool[key]), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(sizes)), sizes)
        ax.set_ylabel(label)
        ax.set_xlabel("model size")
    axes[1].set_yscale("log")
    axes[1].axhline(results["budget_mib"], color="black", linestyle="--", linewidth=1,
                    label=f"--max-memory {results['budget']}")
    handles: dict[str, Any] = {}
    for ax in axes:
        for handle, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, handle)
    rows = 1 if len(handles) <= 5 else 2
    fig.legend(handles.values(), handles.keys(), loc="upper center", ncol=-(-len(handles) // rows), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.92 if rows == 1 else 0.87))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Build the models and time every tool on every size; return the results document."""
    workdir: Path = args.workdir.resolve()
    (workdir / "out").mkdir(parents=True, exist_ok=True)
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    paths = Paths(python=args.python, lorastream=args.lorastream, litgpt=args.litgpt)
    budget_mib = parse_size(args.max_memory) / MIB
    results: dict[str, Any] = {
        "meta": machine_info(paths),
        "repeats": args.repeats,
        "budget": args.max_memory,
        "budget_mib": budget_mib,
        "floor": measure_floor(paths.python),
        "sizes": {},
    }
    compute_gbps = results["floor"].get("compute", {}).get("blocked_gbps")
    for size in args.sizes:
        names = [name for name in args.tools if f"{size}:{name}" not in args.skip]
        manifest = build_models(size, workdir, paths.python, nf4=any(t in NF4_TOOLS for t in names))
        tools = tools_for(size, manifest, workdir / "out", paths, args.max_memory)
        selected = {name: tools[name] for name in names}
        runs: dict[str, list[RunResult]] = {name: [] for name in selected}
        for rep in range(1, args.repeats + 1):
            for name, tool in selected.items():
                if any(r.error for r in runs[name]):
                    continue  # a failed tool is not retried
                result = run_once(tool, workdir / "logs" / f"{size}-{name}-{rep}", args.timeout)
                runs[name].append(result)
                shown = (f"failed (exit {result.exit_status}): {result.error}" if result.error else
                         f"{result.wall_s:.2f} s, {(result.peak_rss_kib or 0) / 1024:.0f} MiB")
                print(f"[{size}] {TOOL_LABELS[name]:<22} run {rep}/{args.repeats}: {shown}", flush=True)
        summaries = {name: summarize(runs[name], selected[name].argv) for name in selected}
        results["sizes"][size] = {
            "model": manifest,
            "tools": summaries,
            "ratios": ratios(summaries, budget_mib, manifest, compute_gbps),
        }
    return results


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="2gb,8gb", help=f"comma-separated sizes ({', '.join(SIZES)})")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per tool and size")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lsbench"),
                        help="where models, outputs and logs go")
    parser.add_argument("--results-dir", type=Path, default=HERE,
                        help="where results.json/.md/.png are written")
    parser.add_argument("--tools", default=",".join(TOOLS),
                        help=f"comma-separated subset of {','.join(TOOLS)}")
    parser.add_argument("--skip", default="",
                        help="comma-separated SIZE:TOOL pairs not to run, e.g. 7b:lorastream-nf4,7b:peft-nf4")
    parser.add_argument("--max-memory", default="512MiB", help="lorastream's --max-memory budget")
    parser.add_argument("--readme", type=Path,
                        help="also replace the results section of this README (between its benchmark-results "
                        "marker lines) with the new tables")
    parser.add_argument("--timeout", type=float, default=4 * 3600, help="seconds before a run is killed")
    parser.add_argument("--python", type=Path, default=ROOT / ".venv" / "bin" / "python",
                        help="python with torch, transformers and peft (runs PEFT and make_models.py)")
    parser.add_argument("--lorastream", type=Path, default=ROOT / ".venv" / "bin" / "lorastream")
    parser.add_argument("--litgpt", type=Path, default=ROOT / ".venv-litgpt" / "bin" / "litgpt")
    args = parser.parse_args(argv)
    args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    args.tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = sorted(set(args.tools) - set(TOOLS))
    if unknown:
        parser.error(f"unknown tools: {', '.join(unknown)}")
    unknown = sorted(set(args.sizes) - set(SIZES))
    if unknown:
        parser.error(f"unknown sizes: {', '.join(unknown)}")
    args.skip = {pair.strip() for pair in args.skip.split(",") if pair.strip()}
    unknown = sorted(p for p in args.skip if p.partition(":")[0] not in SIZES or p.partition(":")[2] not in TOOLS)
    if unknown:
        parser.error(f"--skip: not SIZE:TOOL pairs of known sizes and tools: {', '.join(unknown)}")
    if args.readme and not {README_START, README_END} <= set(args.readme.read_text().splitlines()):
        parser.error(f"{args.readme} lacks the marker lines {README_START!r} and {README_END!r}")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    parse_size(args.max_memory)
    if not TIME_BIN.is_file():
        parser.error(f"{TIME_BIN} is missing (GNU time; on Debian: apt-get install -y time)")

    results = benchmark(args)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(results, args.results_dir / "results.md")
    plotted = write_plot(results, args.results_dir / "results.png")
    written = [args.results_dir / n for n in ("results.json", "results.md", *(["results.png"] if plotted else []))]
    if args.readme:
        update_readme(args.readme, (args.results_dir / "results.md").read_text())
        written.append(args.readme)
    print(f"wrote {', '.join(map(str, written))}")
    print((args.results_dir / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
