"""Batch jobs: many merges listed in one YAML file, all checked before the first runs, then run one after
another here or as Ray tasks, with a summary of what succeeded and what failed and why.

A job is a PEFT merge (`base`, `adapters`, `out`, and `merge`'s options) or, with `lora_run`, a LitGPT merge
(`merge-litgpt`'s options). The fields are the keyword arguments of `api.merge` / `api.merge_litgpt`, so a new
option there is a field here; relative paths are taken from the YAML file's folder.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from . import api, ray_executor
from .dtypes import FLOAT_DTYPES
from .errors import ExitStatus, InputError, LorastreamError
from .litgpt import FORMATS as LITGPT_FORMATS
from .memory import default_budget, parse_size

_NOT_FIELDS = {"progress", "executor", "ray_address"}
_PATH_FIELDS = {"base", "adapters", "out", "lora_run"}


def _text(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("expected a non-empty string")
    return value


def _texts(value: object) -> list[str]:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values:
        raise ValueError("expected a path or a non-empty list of paths")
    return [_text(v) for v in values]


def _numbers(value: object) -> list[float]:
    if not isinstance(value, list) or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
        raise ValueError("expected a list of numbers such as [0.7, 0.3]")
    return [float(v) for v in value]


def _size(value: object) -> str | int:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError("expected a size such as 2GiB")
    try:
        parse_size(value)
    except (InputError, ValueError) as exc:
        raise ValueError(str(exc)) from None
    return value


def _flag(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError("expected true or false")
    return value


def _choice(*options: str) -> Callable[[object], str]:
    def check(value: object) -> str:
        if value not in options:
            raise ValueError(f"expected one of {', '.join(options)}")
        return str(value)

    return check


def _scalar(value: object) -> object:
    if not isinstance(value, str | int | float | bool):
        raise ValueError("expected a string, number or true/false")
    return value


_CHECKS: dict[str, Callable[[object], Any]] = {
    "base": _text, "adapters": _texts, "out": _text, "lora_run": _text, "weights": _numbers, "max_memory": _size,
    "max_shard_size": _size, "dtype": _choice(*FLOAT_DTYPES), "quantize": _choice("nf4", "fp4", "int8"),
    "trained_on": _choice("nf4", "fp4"), "format": _choice(*LITGPT_FORMATS), "double_quant": _flag,
    "overwrite": _flag, "allow_nonfinite": _flag,
}


@dataclass(frozen=True)
class Job:
    """One checked job: which API call, with which keyword arguments (paths absolute)."""

    index: int  # 1-based, as errors and the summary name it
    arguments: dict[str, Any]

    @property
    def is_litgpt(self) -> bool:
        return "lora_run" in self.arguments

    @property
    def out(self) -> str:
        return str(self.arguments.get("out") or Path(self.arguments["lora_run"]) / "lit_model.pth")


def run_job(job: Job, max_memory: int | None = None) -> api.MergeResult:
    """Run one job here, or in a Ray worker with the memory its task reserved as its budget."""
    arguments = {**job.arguments, **({"max_memory": max_memory} if max_memory is not None else {})}
    if job.is_litgpt:
        return api.merge_litgpt(arguments.pop("lora_run"), **arguments)
    return api.merge(**arguments)


@dataclass(frozen=True)
class Outcome:
    job: Job
    status: str  # "ok", "failed", or "skipped" (not run once a job failed, without --continue-on-error)
    seconds: float = 0.0
    bytes_written: int = 0
    error: str = ""
    exit_code: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"index": self.job.index, "out": self.job.out, "status": self.status,
                "seconds": round(self.seconds, 3), "bytes_written": self.bytes_written, "error": self.error,
                "exit_code": self.exit_code}


def _fields(call: Callable[..., Any]) -> set[str]:
    return set(inspect.signature(call).parameters) - _NOT_FIELDS


def _check_job(index: int, entry: object, defaults: dict[str, Any], folder: Path) -> Job:
    if not isinstance(entry, dict):
        raise InputError(f"job {index}: expected a mapping of fields (base, adapters, out, ...)")
    entry = {**_renamed(defaults), **_renamed(entry)}
    litgpt = "lora_run" in entry
    allowed = (_fields(api.merge_litgpt) - {"lora_dir"}) | {"lora_run"} if litgpt else _fields(api.merge)
    required = ["lora_run"] if litgpt else ["base", "adapters", "out"]
    arguments: dict[str, Any] = {}
    for name in required:
        if name not in entry:
            raise InputError(f"job {index}: field {name!r} is missing")
    for name, value in entry.items():
        if name not in allowed:
            raise InputError(f"job {index}: unknown field {name!r} (expected one of {', '.join(sorted(allowed))})")
        try:
            arguments[name] = _CHECKS.get(name, _scalar)(value)
        except ValueError as exc:
            raise InputError(f"job {index}: field {name!r}: {value!r}: {exc}") from None
        if name in _PATH_FIELDS:
            arguments[name] = _absolute(arguments[name], folder)
    return Job(index, arguments)


def _renamed(fields: dict[str, Any]) -> dict[str, Any]:
    """`adapter: PATH` is `adapters: PATH`."""
    return {("adapters" if name == "adapter" else name): value for name, value in fields.items()}


def _absolute(value: str | list[str], folder: Path) -> str | list[str]:
    if isinstance(value, list):
        return [str(_absolute(v, folder)) for v in value]
    return value if "://" in value else str(folder / Path(value).expanduser())


def load_jobs(path: Path) -> list[Job]:
    """Read and check every job of a batch file; the first problem is an `InputError` naming job and field."""
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise InputError(f"{path}: cannot read the batch file ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    document = {"jobs": document} if isinstance(document, list) else document
    if not isinstance(document, dict) or not isinstance(document.get("jobs"), list) or not document["jobs"]:
        raise InputError(f"{path}: expected a list of jobs, or a mapping with `jobs:` (a list) and `defaults:`")
    if set(document) - {"jobs", "defaults"}:
        raise InputError(f"{path}: unknown top-level keys {sorted(set(document) - {'jobs', 'defaults'})}; expected "
                         "jobs and defaults")
    defaults = document.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise InputError(f"{path}: defaults: expected a mapping of fields")
    try:
        jobs = [_check_job(i, entry, defaults, path.parent.absolute())
                for i, entry in enumerate(document["jobs"], start=1)]
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None
    seen: dict[str, int] = {}
    for job in jobs:
        if job.out in seen:
            raise InputError(f"{path}: job {job.index}: writes {job.out}, as job {seen[job.out]} does")
        seen[job.out] = job.index
    return jobs


def _failed(job: Job, exc: BaseException, seconds: float = 0.0) -> Outcome:
    if isinstance(exc, OSError):
        message = f"{exc.filename}: {exc.strerror or exc}" if exc.filename else str(exc)
        return Outcome(job, "failed", seconds, error=message, exit_code=ExitStatus.SYSTEM)
    return Outcome(job, "failed", seconds, error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                   exit_code=getattr(exc, "exit_code", ExitStatus.FAILURE))


def _succeeded(job: Job, result: api.MergeResult) -> Outcome:
    return Outcome(job, "ok", result.seconds, result.bytes_written)


def run_jobs(jobs: list[Job], *, executor: str = "local", continue_on_error: bool = False,
             ray_address: str | None = None, report: Callable[[Outcome], None] = lambda _o: None) -> list[Outcome]:
    """Run every job (here in order, or as Ray tasks at once); after a failure, skip the rest unless
    `continue_on_error`. `report` sees each outcome as it comes. Outcomes are returned in job order."""
    if executor not in api.EXECUTORS:
        raise InputError(f"--executor {executor!r}: expected one of {', '.join(api.EXECUTORS)}")
    outcomes: dict[int, Outcome] = {}

    def note(outcome: Outcome) -> bool:
        """Keep and report an outcome; whether to go on."""
        outcomes[outcome.job.index] = outcome
        report(outcome)
        return outcome.status == "ok" or continue_on_error

    if executor == "ray":
        budgets = [parse_size(job.arguments.get("max_memory") or default_budget()) for job in jobs]
        ray_executor.run_tasks(run_job, list(zip(jobs, budgets, strict=True)), budgets,
                               [f"job {job.index}" for job in jobs],
                               lambda i, result: note(_succeeded(jobs[i], result)),
                               lambda i, exc: note(_failed(jobs[i], exc)), ray_address)
    else:
        for job in jobs:
            started = time.perf_counter()
            try:
                outcome = _succeeded(job, run_job(job))
            except (LorastreamError, OSError) as exc:
                outcome = _failed(job, exc, time.perf_counter() - started)
            if not note(outcome):
                break
    return [outcomes.get(job.index) or Outcome(job, "skipped", error="an earlier job failed") for job in jobs]
