"""Rerunning a merge that already completed: the same job is "already up to date" (exit 0, nothing rewritten);
other inputs or options still need --overwrite."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from click.testing import CliRunner, Result

from lorastream.cli import main


def merge(base: Path, adapter: Path, out: Path, *options: str) -> Result:
    return CliRunner().invoke(main, ["merge", str(base), str(adapter), "-o", str(out), "--max-memory", "4GiB", "-q",
                                     *options])


def stamps(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.iterdir())}


def test_the_same_merge_again_is_up_to_date(demo_inputs: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = demo_inputs
    out = tmp_path / "out"
    assert merge(base, adapter, out).exit_code == 0
    written = stamps(out)
    again = merge(base, adapter, out, "--max-memory", "3GiB")  # the budget does not shape the output
    assert again.exit_code == 0, again.output
    assert f"{out}: already up to date" in again.stderr and "wrote" not in again.stderr
    assert stamps(out) == written


def test_other_options_or_inputs_still_need_overwrite(demo_inputs: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = demo_inputs
    out = tmp_path / "out"
    assert merge(base, adapter, out).exit_code == 0
    other_dtype = merge(base, adapter, out, "--dtype", "float32")
    assert other_dtype.exit_code == 2 and "--overwrite" in other_dtype.stderr, other_dtype.output
    changed = tmp_path / "adapter"
    shutil.copytree(adapter, changed)
    weights = changed / "adapter_model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    other_adapter = merge(base, changed, out)
    assert other_adapter.exit_code == 2 and "--overwrite" in other_adapter.stderr, other_adapter.output
    replaced = merge(base, adapter, out, "--dtype", "float32", "--overwrite")
    assert replaced.exit_code == 0 and "wrote" in replaced.stderr, replaced.output
