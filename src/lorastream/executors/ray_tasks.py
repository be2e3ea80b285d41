"""Runs work as Ray tasks: a merge's shards, or a batch's jobs, each in a worker with its own memory budget.

A task gets paths and options, never big objects: it re-plans from headers in its worker (header reads only)
and writes straight into the staging folder, which every node must reach (a shared filesystem). Only the
driver writes the manifest: it records each shard a task reports committed, exactly as a local merge records
them from its writer thread, so there is one writer and no locking across machines. A shard whose task
finished after the driver died is not in the manifest; a rerun redoes it, as a local rerun redoes the shard
it was on (Ray ends a dead driver's tasks at once, measured: their workers are gone within 0.1 s, so the
rerun does not race them). Tasks whose worker dies (killed, out of memory, node lost) are retried by Ray.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from ..engine import Progress, write_shards
from ..errors import InputError, LorastreamError, ResourceError, WorkerError
from ..inputs import hf as hf_input
from ..io.locations import Location, location
from ..io.staging import Staging
from ..memory import format_size
from ..options import MergeOptions
from ..outputs import writer
from ..outputs.base import Output
from ..planner import describe_shortfall

# Attempts after the first when a task's worker dies; an error the task raises itself is not retried.
MAX_RETRIES = 3
# How long a force-cancelled task may take to end before its staging folder is removed anyway.
CANCEL_WAIT_S = 60


def connect(address: str | None, *memory: int) -> ModuleType:
    """Ray, connected: to `address`, else to the Ray instance this machine runs, else a new local one; refuses
    a `memory` reservation no node can make (Ray would wait for such a task forever)."""
    try:
        import ray
    except ImportError:
        raise InputError("--executor ray needs Ray, which is not installed: pip install 'lorastream[ray]'") from None
    if not ray.is_initialized():
        try:
            ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise InputError(f"--ray-address {address or '(this machine)'}: cannot connect to Ray ({exc})") from None
    largest = max((n["Resources"].get("memory", 0) for n in ray.nodes() if n["Alive"]), default=0)
    if memory and max(memory) > largest:
        raise ResourceError(f"--max-memory {format_size(max(memory))}: no Ray node offers that much memory (the "
                            f"largest offers {format_size(largest)}); use a smaller --max-memory")
    return ray


def _failure(ray: ModuleType, exc: BaseException, label: str) -> BaseException:
    """The error a failed task stands for: the task's own (`InputError`, ...), or why its worker was lost."""
    if isinstance(exc, ray.exceptions.RayTaskError):
        return exc.cause if isinstance(exc.cause, LorastreamError | OSError) else exc
    if isinstance(exc, ray.exceptions.OutOfMemoryError):
        return ResourceError(f"{label}: Ray stopped the task because its node ran out of memory; use a smaller "
                             "--max-memory or give the node more")
    return WorkerError(f"{label}: the Ray worker running it was lost ({type(exc).__name__}), also after "
                       f"{MAX_RETRIES} retries; see the Ray logs")


def run_tasks(fn: Callable[..., Any], calls: Sequence[tuple[Any, ...]], memory: Sequence[int],
              labels: Sequence[str], on_result: Callable[[int, Any], None],
              on_error: Callable[[int, BaseException], bool], address: str | None = None) -> None:
    """Run `fn(*calls[i])` as Ray tasks, reserving `memory[i]` bytes each, and report each as it finishes.

    `on_error` gets the task's error and says whether to go on; when it says no, or anything else stops this
    loop (an interruption, an error `on_result` raises), the tasks still running are cancelled and waited for,
    so none writes afterwards.
    """
    ray = connect(address, *memory)
    remote = ray.remote(fn)
    pending = {remote.options(memory=size, num_cpus=1, max_retries=MAX_RETRIES).remote(*args): i
               for i, (args, size) in enumerate(zip(calls, memory, strict=True))}
    try:
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            index = pending.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayError as exc:
                if not on_error(index, _failure(ray, exc, labels[index])):
                    break
                continue
            on_result(index, result)
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
        if pending:
            ray.wait(list(pending), num_returns=len(pending), timeout=CANCEL_WAIT_S)


@dataclass(frozen=True)
class ShardJob:
    """What a worker needs to write shards of a merge: the inputs and options to plan it again, not the plan."""

    base: str
    adapters: tuple[str, ...]
    out_dir: str
    options: MergeOptions  # max_memory is the driver's budget, in bytes
    staging: str
    record: dict[str, Any]
    writer: str


def write_shard(job: ShardJob, index: int, expected: tuple[str, int]) -> tuple[str, int, int]:
    """In a Ray worker: plan the merge again, write shard `index` into the staging folder, return its record."""
    plan = hf_input.plan(job.base, list(job.adapters), job.out_dir, job.options)
    if not plan.memory.fits:  # the disk was checked by the driver; here it is filling with other shards
        raise ResourceError(f"on this Ray node: {describe_shortfall(plan)}")
    shard = plan.shards[index] if index < len(plan.shards) else None
    if shard is None or (shard.filename, shard.nbytes) != expected:
        raise InputError(f"{job.base}: this Ray node's input files plan another output than the driver's (shard "
                         f"{expected[0]}); every node needs the same inputs")
    staging = location(job.staging)
    if isinstance(staging, Path) and not staging.is_dir():
        raise InputError(f"{staging}: the staging folder is not visible on this Ray node; -o must be on a "
                         "filesystem every node shares")
    sink = writer(job.writer)
    committed: list[tuple[str, int, int]] = []
    write_shards(plan, lambda planned: sink.open_shard(staging, planned, job.record), lambda _n: None,
                 finished={s.filename for s in plan.shards} - {shard.filename},
                 on_committed=lambda *record: committed.append(record), allow_nonfinite=job.options.allow_nonfinite)
    return committed[0]


def _portable(value: Location) -> str:
    """A path a Ray worker on another machine can open: absolute, or the URL as given."""
    return str(value.absolute())


def write(output: Output, staging: Staging, options: MergeOptions, progress: Progress) -> None:
    """The Ray counterpart of the local executor for one output: one task per shard not yet in the manifest."""
    plan = output.plan
    job = ShardJob(_portable(plan.base.path), tuple(_portable(location(a.source)) for a, _ in plan.adapters),
                   _portable(plan.out_dir), dataclasses.replace(options, max_memory=plan.memory.budget),
                   str(staging.path), output.record, output.writer.name)
    todo = [(i, s) for i, s in enumerate(plan.shards) if s.filename not in staging.finished()]
    progress(plan.total_size - sum(s.nbytes for _, s in todo))

    def record(task: int, result: tuple[str, int, int]) -> None:
        staging.record(*result)
        progress(todo[task][1].nbytes)

    def stop(_task: int, exc: BaseException) -> bool:
        raise exc

    run_tasks(write_shard, [(job, i, (s.filename, s.nbytes)) for i, s in todo], [plan.memory.budget] * len(todo),
              [s.filename for _, s in todo], record, stop, options.ray_address)
