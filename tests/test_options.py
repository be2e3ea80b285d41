"""One options model: MergeOptions checks values with the CLI's words, the CLI's options are its fields, and an
option the job cannot honour is refused, not ignored."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

import lorastream
from lorastream import options
from lorastream.cli import main
from lorastream.errors import InputError
from lorastream.options import MergeOptions


def test_values_are_checked_with_the_cli_s_words() -> None:
    with pytest.raises(InputError, match=r"^--dtype 'fp8': expected one of bfloat16, float16, float32$"):
        MergeOptions(dtype="fp8")
    with pytest.raises(InputError, match=r"^--max-memory 'lots': size 'lots': expected a number"):
        MergeOptions(max_memory="lots")
    assert MergeOptions(weights=[1, 0.5]).weights == (1.0, 0.5)
    with pytest.raises(TypeError, match="unknown merge option"):
        MergeOptions.of(None, {"rank": 8})


@pytest.mark.parametrize("command", [options.MERGE, options.PLAN, options.MERGE_LITGPT, options.PLAN_LITGPT,
                                     options.VERIFY, options.VERIFY_LITGPT])
def test_each_command_shows_exactly_its_fields(command: str) -> None:
    shown = {o for p in main.commands[command].params for o in getattr(p, "opts", [])}
    fields = {options.flag(name) for name in options.for_command(command)}
    assert fields <= shown
    other = {options.flag(name) for name in options.names()} - fields
    assert not other & shown


def test_a_hugging_face_base_is_not_written_as_lit_model(demo_inputs: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = demo_inputs
    with pytest.raises(InputError, match="--format litgpt"):
        lorastream.merge(base, adapter, tmp_path / "out", format="litgpt")
    assert not (tmp_path / "out").exists()
    done = CliRunner().invoke(main, ["plan", str(base), str(adapter), "-o", str(tmp_path / "out"), "--format", "hf"])
    assert done.exit_code == 0, done.output
