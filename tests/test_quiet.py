"""The CLI shows lorastream's own output only: third-party warnings, logging and progress bars are silenced
for a command's duration, and left as they were for a program that imports lorastream."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings
from pathlib import Path

from click.testing import CliRunner

from lorastream.cli import main

# What `lorastream demo` prints (on stderr), line by line, and nothing else.
DEMO_LINES = ("built a random Llama-style model", "merged into ", "MiB in ", "compared with PEFT merge_and_unload")


def test_demo_prints_only_its_own_lines(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "lorastream", "demo", "--keep", str(tmp_path / "demo")],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == len(DEMO_LINES) and all(line.startswith(start) or start in line
                                                 for line, start in zip(lines, DEMO_LINES, strict=True)), lines
    assert done.stdout == ""


def test_a_command_leaves_the_caller_s_warning_and_logging_settings(demo_inputs: tuple[Path, Path],
                                                                    tmp_path: Path) -> None:
    base, adapter = demo_inputs
    filters = list(warnings.filters)
    levels = {name: logging.getLogger(name).level for name in ("transformers", "bitsandbytes")}
    done = CliRunner().invoke(main, ["merge", str(base), str(adapter), "-o", str(tmp_path / "out"), "-q"])
    assert done.exit_code == 0, done.output
    assert warnings.filters == filters
    assert {name: logging.getLogger(name).level for name in levels} == levels
