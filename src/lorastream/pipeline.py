"""The merge pipeline, the same for every input family and output format:

    check -> plan -> stage -> execute -> companions -> promote

An input family (`inputs/`) does the first two: it checks the destinations and plans each output (headers
only), describing it as an `Output` (plan, writer, provenance, job id). `run` does the rest: finds outputs
already complete from the same job (a rerun: nothing to do), refuses a pass that cannot fit, gives each
output its locked, resumable staging folder, lets the executor (`executors/`, local or Ray) write the shards,
has each output's writer (`outputs/`) add its other files, and promotes each staging folder into place.
Nothing appears at a destination before its output is complete.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import executors
from .device import Accelerator
from .engine import Progress
from .errors import ResourceError
from .io.staging import promote, staging_for
from .memory import peak_rss
from .options import MergeOptions
from .outputs.base import Output, check_rerun
from .planner import describe_shortfall


@dataclass(frozen=True)
class MergeResult:
    """What a finished merge produced and what it cost."""

    out_dir: Path
    files: list[str]
    bytes_written: int
    seconds: float
    peak_rss: int
    budget: int
    up_to_date: bool = False  # the output was already there, from the same job: nothing was written
    changed: dict[str, int] = field(default_factory=dict)  # tensors the adapters changed, per model component

    def to_json(self) -> dict[str, Any]:
        return {"out_dir": str(self.out_dir), "files": self.files, "bytes_written": self.bytes_written,
                "seconds": round(self.seconds, 3), "peak_rss": self.peak_rss, "budget": self.budget,
                "up_to_date": self.up_to_date, "changed": self.changed}


def run(outputs: list[Output], options: MergeOptions, progress: Progress | None = None,
        accelerator: Accelerator | None = None) -> list[MergeResult]:
    """Write every output of one pass over the base, each atomically, within the plans' budget."""
    started = time.perf_counter()
    done = [check_rerun(o, options.overwrite) for o in outputs]
    if all(done):
        return [_result(o, started, up_to_date=True) for o in outputs]
    shortfall = describe_shortfall(*(o.plan for o in outputs))
    if shortfall:
        raise ResourceError(shortfall)
    executors.prepare(outputs, options)
    with ExitStack() as stack:
        stagings = [stack.enter_context(staging_for(o.destination, o.key, options.overwrite)) for o in outputs]
        executors.write(outputs, stagings, options, progress or (lambda _n: None), accelerator)
        for output, staging in zip(outputs, stagings, strict=True):
            if output.single_file:
                staging.promote_file(output.plan.shards[0].filename, output.destination)
            else:
                output.writer.finish(output.plan, staging.path,
                                     {**output.record, "job": output.key, "shards": staging.shards})
                promote(staging, output.destination, output.writer.last)
    return [_result(o, started) for o in outputs]


def _result(output: Output, started: float, up_to_date: bool = False) -> MergeResult:
    files = [output.destination.name] if output.single_file else sorted(p.name for p in output.destination.iterdir())
    return MergeResult(output.plan.out_dir, files, output.plan.total_size, time.perf_counter() - started, peak_rss(),
                       output.plan.memory.budget, up_to_date, output.plan.changed)
