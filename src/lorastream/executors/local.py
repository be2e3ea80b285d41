"""The local executor: every output's shards written in this process, in one pass over the base."""

from __future__ import annotations

from ..device import Accelerator
from ..engine import Progress, write_outputs
from ..io.staging import Staging
from ..options import MergeOptions
from ..outputs.base import Output


def write(outputs: list[Output], stagings: list[Staging], options: MergeOptions, progress: Progress,
          accelerator: Accelerator | None) -> None:
    """Write the shards not yet in each staging folder's manifest; each is recorded there as it commits."""
    write_outputs([o.plan for o in outputs],
                  lambda k, shard: outputs[k].writer.open_shard(stagings[k].path, shard, outputs[k].record), progress,
                  finished=[staging.finished() for staging in stagings],
                  on_committed=lambda k, name, size, crc: stagings[k].record(name, size, crc),
                  allow_nonfinite=options.allow_nonfinite, accelerator=accelerator)
