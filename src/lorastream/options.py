"""One options model for a merge: the API's keyword arguments, the CLI's options, batch YAML fields and Ray task
payloads are all `MergeOptions`, so an option is added in one place.

Each field carries its CLI description in its metadata (`Spec`): help, choices, which commands show it, how a
value is checked. `MergeOptions(...)` checks every value and refuses a bad one with the CLI's words
(`--dtype 'fp8': expected one of ...`); `cli.py` builds its options from `specs()`, and batch checks a YAML
field with `check_field`, so the three cannot drift apart (as mergekit's MergeOptions does for its CLI).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .device import DEVICES, Accelerator
from .dtypes import FLOAT_DTYPES, GGUF_QUANT_PRESETS
from .errors import InputError
from .memory import parse_size
from .outputs import WRITERS

EXECUTORS = ("local", "ray")
OUTPUT_FORMATS = tuple(WRITERS)
QUANTIZE = ("nf4", "fp4", "int8", *GGUF_QUANT_PRESETS)
TRAINED_ON = ("nf4", "fp4")

# The commands an option belongs to (as the CLI names them); `batch` jobs take those of merge / merge-litgpt.
MERGE, PLAN, VERIFY = "merge", "plan", "verify"
MERGE_LITGPT, PLAN_LITGPT, VERIFY_LITGPT = "merge-litgpt", "plan-litgpt", "verify-litgpt"
PEFT_COMMANDS = frozenset({MERGE, PLAN})
LITGPT_COMMANDS = frozenset({MERGE_LITGPT, PLAN_LITGPT})
ALL_PLANS = PEFT_COMMANDS | LITGPT_COMMANDS


@dataclass(frozen=True)
class Spec:
    """How an option is shown and checked. `check` takes a typed value (API, YAML) and returns it normalized,
    or raises `ValueError` saying what was expected; `parse` turns the CLI's text into that typed value."""

    help: str
    commands: frozenset[str]
    check: Callable[[Any], Any]
    choices: tuple[str, ...] = ()
    parse: Callable[[str], Any] | None = None
    per_job: bool = True  # False: an option of a whole `batch` run (its executor), not of each job in it

    @property
    def is_flag(self) -> bool:
        return self.check is _flag

    @property
    def is_switch(self) -> bool:
        """An on/off option whose default (None) lets the job decide: `--double-quant/--no-double-quant`."""
        return self.check is _optional_flag


def _option(default: Any, help: str, commands: frozenset[str], check: Callable[[Any], Any], **spec: Any) -> Any:
    return field(default=default, metadata={"spec": Spec(help, commands, check, **spec)})


def _text(value: Any) -> str | None:
    if value is not None and (not isinstance(value, str) or not value):
        raise ValueError("expected a non-empty string")
    return value


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("expected true or false")
    return value


def _optional_flag(value: Any) -> bool | None:
    return None if value is None else _flag(value)


def _size(value: Any) -> str | int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError("expected a size such as 2GiB")
    try:
        parse_size(value)
    except InputError as exc:
        raise ValueError(str(exc)) from None
    return value


def _weights(value: Any) -> tuple[float, ...] | None:
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, Sequence) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in value):
        raise ValueError("expected a list of numbers such as [0.7, 0.3]")
    return tuple(float(v) for v in value)


def _parse_weights(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(w) for w in text.split(","))
    except ValueError:
        raise ValueError("expected comma-separated numbers such as 0.7,0.3") from None


def _choice(*choices: str, optional: bool = True) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if value is None and optional:
            return None
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return str(value)

    return check


def _device(value: Any) -> str | Accelerator:
    """A device name, or an `Accelerator` as given (tests pass the CPU standing in for a GPU)."""
    return value if isinstance(value, Accelerator) else str(_choice(*DEVICES, optional=False)(value))


@dataclass(frozen=True)
class MergeOptions:
    """How to merge; the inputs and the output folder are not options. Every value is checked on creation."""

    weights: tuple[float, ...] | None = _option(
        None, "Comma-separated weight per adapter (default 1 each; verify: as recorded).",
        PEFT_COMMANDS | {VERIFY}, _weights, parse=_parse_weights)
    revision: str | None = _option(
        None, "With a Hub repo id as BASE: the branch, tag or commit (default: main), as from_pretrained takes it.",
        PEFT_COMMANDS | {VERIFY}, _text)
    max_memory: str | int | None = _option(
        None, "Peak RSS budget for the whole process, e.g. 512MiB, 2GiB, 4GB (default: half the available memory, "
        "at most 4 GiB).", ALL_PLANS | {VERIFY, VERIFY_LITGPT}, _size)
    dtype: str | None = _option(
        None, "Output dtype of floating tensors (default: as in the base; for a LitGPT run the LoRA weights', as "
        "LitGPT).", ALL_PLANS | {VERIFY_LITGPT}, _choice(*FLOAT_DTYPES), choices=tuple(FLOAT_DTYPES))
    max_shard_size: str | int = _option("5GB", "Largest output shard.", ALL_PLANS, _size)
    quantize: str | None = _option(
        None, "Write linear weights in bitsandbytes' format (transformers loads it as is); with --format gguf, a "
        "GGUF type or llama-quantize preset (q8_0, q4_0, q4_1, q5_0, q5_1, q4_k_m, q5_k_m, q6_k).", ALL_PLANS,
        _choice(*QUANTIZE), choices=QUANTIZE)
    trained_on: str | None = _option(
        None, "Merge into the base as QLoRA training saw it, dequantize(quantize(W)), not the dense weights.",
        ALL_PLANS | {VERIFY_LITGPT}, _choice(*TRAINED_ON), choices=TRAINED_ON)
    double_quant: bool | None = _option(
        None, "4-bit: quantize the block statistics too (default: on for nf4, off for fp4; for a LitGPT run's "
        "--trained-on, as its quantize setting says, bnb.nf4-dq).", ALL_PLANS | {VERIFY_LITGPT}, _optional_flag)
    format: str | None = _option(
        None, "Output format: hf (a safetensors folder; the default for a Hugging Face base; for a LitGPT run with "
        "LitGPT's key map and a config.json), litgpt (lit_model.pth; the default for a LitGPT run, written into "
        "the run folder without -o) or gguf (one .gguf file for llama.cpp, Ollama, LM Studio; pip install "
        "'lorastream[gguf]').", ALL_PLANS, _choice(*OUTPUT_FORMATS), choices=OUTPUT_FORMATS)
    device: str | Accelerator = _option(  # noqa: RUF009 (a field() with metadata, as the others)
        "cpu", "Merge on the CPU or a CUDA GPU (auto: the GPU if there is one; cuda without one merges on the "
        "CPU, with a notice).", PEFT_COMMANDS, _device, choices=DEVICES)
    max_gpu_memory: str | int | None = _option(
        None, "GPU memory budget for the merge, e.g. 20GiB (default: 80% of the GPU's free memory).",
        PEFT_COMMANDS, _size)
    executor: str = _option(
        "local", "Run in this process, or as Ray tasks (pip install 'lorastream[ray]'), each within its "
        "--max-memory.", frozenset({MERGE}), _choice(*EXECUTORS, optional=False), choices=EXECUTORS, per_job=False)
    ray_address: str | None = _option(
        None, "Ray cluster to run on (default: the Ray instance this machine runs, else a new local one).",
        frozenset({MERGE}), _text, per_job=False)
    overwrite: bool = _option(
        False, "Replace an existing output (only once the new one is complete).", frozenset({MERGE, MERGE_LITGPT}),
        _flag)
    allow_nonfinite: bool = _option(
        False, "Keep NaN/Inf in merged tensors instead of refusing.", frozenset({MERGE, MERGE_LITGPT}), _flag)
    verify: bool = _option(
        False, "Recompute and compare the output after writing it.", frozenset({MERGE}), _flag)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            try:
                object.__setattr__(self, f.name, spec(f.name).check(getattr(self, f.name)))
            except ValueError as exc:
                raise InputError(f"{flag(f.name)} {getattr(self, f.name)!r}: {exc}") from None

    def given(self) -> dict[str, Any]:
        """The options that differ from their defaults, by name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != f.default}

    @classmethod
    def of(cls, options: MergeOptions | None, fields: dict[str, Any]) -> MergeOptions:
        """`options` (default: all defaults) with `fields` (API keyword arguments) replaced."""
        unknown = set(fields) - set(names())
        if unknown:
            raise TypeError(f"unknown merge option(s) {', '.join(sorted(unknown))}; expected {', '.join(names())}")
        return dataclasses.replace(options or cls(), **fields)


def names() -> list[str]:
    return [f.name for f in dataclasses.fields(MergeOptions)]


def spec(name: str) -> Spec:
    return MergeOptions.__dataclass_fields__[name].metadata["spec"]  # type: ignore[no-any-return]


def default(name: str) -> Any:
    return MergeOptions.__dataclass_fields__[name].default


def flag(name: str) -> str:
    """The CLI's name of an option: `--max-memory`."""
    return "--" + name.replace("_", "-")


def for_command(command: str) -> list[str]:
    """The options a CLI command takes, in declaration order."""
    return [name for name in names() if command in spec(name).commands]


def check_field(name: str, value: Any) -> Any:
    """A batch YAML field's value, checked as `MergeOptions` checks it (`ValueError` says what was expected)."""
    return spec(name).check(value)
