"""Batch jobs: many merges listed in one YAML file, all checked before the first runs, then run one after
another here or as Ray tasks, with a summary of what succeeded and what failed and why.

A job is a PEFT merge (`base`, `adapters`, `out`, and `merge`'s options) or, with `lora_run`, a LitGPT merge
(`merge-litgpt`'s options). The option fields are `MergeOptions` fields, checked as it checks them, so a new
option there is a field here; relative paths are taken from the YAML file's folder.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from . import api, options
from .errors import ExitStatus, InputError, LorastreamError, MismatchError
from .executors import ray_tasks
from .memory import default_budget, parse_size
from .options import MergeOptions

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


_PATH_CHECKS: dict[str, Callable[[object], Any]] = {"base": _text, "adapters": _texts, "out": _text,
                                                    "lora_run": _text}


def _fields(litgpt: bool) -> set[str]:
    """A job's fields: its inputs and output, and the options of the command it runs."""
    command = options.MERGE_LITGPT if litgpt else options.MERGE
    paths = {"lora_run", "out"} if litgpt else {"base", "adapters", "out"}
    return paths | {name for name in options.for_command(command) if options.spec(name).per_job}


@dataclass(frozen=True)
class Job:
    """One checked job: its inputs and output (paths absolute) and its options."""

    index: int  # 1-based, as errors and the summary name it
    paths: dict[str, Any]
    options: MergeOptions

    @property
    def is_litgpt(self) -> bool:
        return "lora_run" in self.paths

    @property
    def out(self) -> str:
        return str(self.paths.get("out") or Path(self.paths["lora_run"]) / "lit_model.pth")


def run_job(job: Job, max_memory: int | None = None) -> api.MergeResult:
    """Run one job here, or in a Ray worker with the memory its task reserved as its budget."""
    chosen = job.options if max_memory is None else dataclasses.replace(job.options, max_memory=max_memory)
    if job.is_litgpt:
        return api.merge_litgpt(job.paths["lora_run"], job.paths.get("out"), chosen)
    result = api.merge(job.paths["base"], job.paths["adapters"], job.paths["out"], chosen)
    if chosen.verify:
        report = api.verify(job.paths["base"], job.paths["adapters"], result.out_dir, max_memory=chosen.max_memory)
        if not report.ok:
            raise MismatchError(f"{result.out_dir}: {sum(not c.ok for c in report.checks) + len(report.unexpected)} "
                                "tensors do not match their recomputation (lorastream verify shows which)")
    return result


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


def _check_job(index: int, entry: object, defaults: dict[str, Any], folder: Path) -> Job:
    if not isinstance(entry, dict):
        raise InputError(f"job {index}: expected a mapping of fields (base, adapters, out, ...)")
    entry = {**_renamed(defaults), **_renamed(entry)}
    litgpt = "lora_run" in entry
    allowed = _fields(litgpt)
    for name in ["lora_run"] if litgpt else ["base", "adapters", "out"]:
        if name not in entry:
            raise InputError(f"job {index}: field {name!r} is missing")
    paths: dict[str, Any] = {}
    chosen: dict[str, Any] = {}
    for name, value in entry.items():
        if name not in allowed:
            raise InputError(f"job {index}: unknown field {name!r} (expected one of {', '.join(sorted(allowed))})")
        try:
            if name in _PATH_FIELDS:
                paths[name] = _absolute(_PATH_CHECKS[name](value), folder)
            else:
                chosen[name] = options.check_field(name, value)
        except ValueError as exc:
            raise InputError(f"job {index}: field {name!r}: {value!r}: {exc}") from None
    return Job(index, paths, MergeOptions(**chosen))


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
    if executor not in options.EXECUTORS:
        raise InputError(f"--executor {executor!r}: expected one of {', '.join(options.EXECUTORS)}")
    outcomes: dict[int, Outcome] = {}

    def note(outcome: Outcome) -> bool:
        """Keep and report an outcome; whether to go on."""
        outcomes[outcome.job.index] = outcome
        report(outcome)
        return outcome.status == "ok" or continue_on_error

    if executor == "ray":
        budgets = [parse_size(job.options.max_memory or default_budget()) for job in jobs]
        ray_tasks.run_tasks(run_job, list(zip(jobs, budgets, strict=True)), budgets,
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
