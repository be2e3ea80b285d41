"""Where does a lorastream merge spend its time? Sample it with py-spy and sum the samples per thread and phase.

    .venv/bin/python benchmarks/profile_merge.py -- .venv/bin/lorastream merge BASE ADAPTER -o OUT --max-memory 512MiB

py-spy samples every thread, idle ones included (so waits, ``fsync`` and ``pwrite`` show up), and writes raw
stacks. A sample's phase is read off its innermost lorastream frame, by the function and the text of the line:

- main thread: ``decode`` (stored rows -> float32 block), ``delta`` (``B[rows] @ A``, scale, add), ``check``
  (the finite test), ``encode`` (float32 -> output dtype or NF4), ``wait read`` / ``wait write`` (blocked on the
  reader or writer thread), ``plan``, ``start-up`` (imports), ``interpreter start/exit``;
- reader thread: ``read`` (``pread`` into the block buffer); writer thread: ``write``, ``checksum`` (CRC-32 for
  the resume manifest), ``copy`` (unchanged tensors, ``copy_file_range``), ``fsync``; ``idle`` for a worker
  thread with nothing queued.

Seconds are the phase's share of the thread's samples times the measured wall time (py-spy falls behind on a
busy machine, so sample counts alone are not seconds). The output folder of the command is not removed.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import linecache
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FRAME = re.compile(r"^(?P<func>.+) \((?P<file>[^()]*?):(?P<line>\d+)\)$")
# py-spy names files relative to sys.path: "lorastream/engine.py"; their text is read from the installed package.
OURS = re.compile(r"(^|/)lorastream/")
SPEC = importlib.util.find_spec("lorastream")
PACKAGE_PARENT = Path(SPEC.origin).parent.parent if SPEC and SPEC.origin else HERE.parent / "src"
# (thread, function name, a piece of the line's text or "") -> phase; the first match wins.
RULES: tuple[tuple[str, str, str, str], ...] = (
    ("writer", "finish", "fsync", "fsync"),
    ("writer", "", "crc32", "checksum"),
    ("writer", "copy_from", "", "copy"),
    ("writer", "_copy", "", "copy"),
    ("writer", "_copy_chunks", "", "copy"),
    ("writer", "write", "", "write"),
    ("reader", "", "", "read"),
    ("main", "take", "", "wait read"),
    ("main", "next_buffer", "", "wait write"),
    ("main", "drain", "", "wait write"),
    ("main", "close", "", "wait write"),
    ("main", "add_rows", "", "delta"),
    ("main", "_add_part_rows", "", "delta"),
    ("main", "_merged", "copy_", "decode"),
    ("main", "_merged", "", "delta"),
    ("main", "write_block", ".sum(", "check"),
    ("main", "write_block", "isfinite", "check"),
    ("main", "", "encode", "encode"),
    ("main", "write_block", "copy_(work)", "encode"),
    ("main", "write_block", "copy_(rows)", "copy"),
    ("main", "read", "copy_", "decode"),
)


def thread_kind(name: str) -> str:
    """``reader``, ``writer`` or ``main`` (any other thread is ``other``)."""
    if "reader" in name:
        return "reader"
    if "writer" in name:
        return "writer"
    return "main" if name == "MainThread" else "other"


def phase(kind: str, frames: list[str]) -> str:
    """The phase of one sample, from its frames (outermost first)."""
    python = [m for m in map(FRAME.match, frames) if m]
    if not python or any(m["func"].endswith(("_exitfunc", "_shutdown")) for m in python):
        return "interpreter start/exit"
    if any(m["func"] == "<module>" for m in python[1:]):  # importing (the first is the script's own frame)
        return "start-up"
    ours = [m for m in python if OURS.search(m["file"])]
    if not ours:
        return "idle" if kind in ("reader", "writer") else "other"
    for match in reversed(ours):
        path = Path(match["file"])
        text = linecache.getline(str(path if path.is_absolute() else PACKAGE_PARENT / path), int(match["line"]))
        func = match["func"].rsplit(".", 1)[-1]
        for rule_kind, rule_func, rule_text, name in RULES:
            if rule_kind == kind and rule_func in ("", func) and rule_text in text:
                return name
    module = Path(ours[-1]["file"]).stem
    return "plan" if module in ("planner", "api", "cli", "safetensors", "hf", "peft", "litgpt") else f"other ({module})"


def summarize(raw: Path) -> dict[tuple[str, str], int]:
    """Samples per (thread kind, phase) in a py-spy ``--format raw --threads`` file."""
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        kind = thread_kind(frames[0].split(": ", 1)[-1])
        counts[(kind, phase(kind, frames[1:]))] += int(count)
    return counts


def render(counts: dict[tuple[str, str], int], wall_s: float) -> str:
    """A markdown table: seconds and share of each thread's samples, per phase."""
    per_thread: collections.Counter[str] = collections.Counter()
    for (kind, _), n in counts.items():
        per_thread[kind] += n
    lines = [f"wall time {wall_s:.1f} s", "", "| thread | phase | seconds | share |", "|---|---|---:|---:|"]
    minor: collections.Counter[str] = collections.Counter()
    for (kind, name), n in sorted(counts.items(), key=lambda kv: (kv[0][0], -kv[1])):
        share = n / per_thread[kind]
        if kind == "other":
            continue
        if share < 0.01:
            minor[kind] += n
            continue
        lines.append(f"| {kind} | {name} | {share * wall_s:.1f} | {share:.0%} |")
    for kind, n in minor.items():
        lines.append(f"| {kind} | (phases under 1% each) | {n / per_thread[kind] * wall_s:.1f} | "
                     f"{n / per_thread[kind]:.0%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=int, default=100, help="samples per second")
    parser.add_argument("--raw", type=Path, help="keep py-spy's raw stacks here (default: a temporary file)")
    parser.add_argument("--py-spy", type=Path, default=Path(sys.executable).parent / "py-spy")
    parser.add_argument("command", nargs="+", help="the command to profile (after --)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        raw = args.raw or Path(tmp) / "profile.raw"
        started = time.monotonic()
        subprocess.run([str(args.py_spy), "record", "--idle", "--threads", "--format", "raw", "--rate",
                        str(args.rate), "--output", str(raw), "--", *args.command], check=True)
        wall_s = time.monotonic() - started
        print(render(summarize(raw), wall_s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
