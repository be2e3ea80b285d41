"""Where a merge pass's shards are written: in this process (`local`) or as Ray tasks (`ray`), behind one call.

An executor gets the pass's outputs (plans, writers, records), their staging folders, the options and a
progress callback, and fills the staging folders with shards, recording each in its manifest; the pipeline
does everything before (checks, plans, staging) and after (companions, promotion).
"""

from __future__ import annotations

from ..device import Accelerator
from ..engine import Progress
from ..errors import InputError
from ..io.staging import Staging
from ..options import MergeOptions
from ..outputs.base import Output
from . import local, ray_tasks


def prepare(outputs: list[Output], options: MergeOptions) -> None:
    """Refuse what the executor cannot run, before anything is staged (a failure there would discard a
    resumable partial output)."""
    if options.executor == "ray":
        if len(outputs) != 1 or outputs[0].writer.name != "hf":
            raise InputError("--executor ray runs single merges into a Hugging Face folder only (not --each, "
                             "not a LitGPT run)")
        ray_tasks.connect(options.ray_address, outputs[0].plan.memory.budget)


def write(outputs: list[Output], stagings: list[Staging], options: MergeOptions, progress: Progress,
          accelerator: Accelerator | None) -> None:
    if options.executor == "ray":
        ray_tasks.write(outputs[0], stagings[0], options, progress)
    else:
        local.write(outputs, stagings, options, progress, accelerator)
