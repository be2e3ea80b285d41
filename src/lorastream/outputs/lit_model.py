"""The LitGPT writer (`--format litgpt`): one `lit_model.pth` (torch's zip format, as `litgpt merge_lora`
writes it), beside the run's config and tokenizer files."""

from __future__ import annotations

import shutil
from typing import Any

from ..engine import ShardSink
from ..formats.litgpt import MODEL_FILE
from ..formats.torchzip_writer import TorchZipWriter
from ..io.locations import Location
from ..planner import Plan, Shard
from .base import write_provenance


class LitModel:
    """`--format litgpt`: the plan's single shard is `lit_model.pth`; the companions are copied beside it."""

    name = "litgpt"
    last = (MODEL_FILE,)

    def open_shard(self, folder: Location, shard: Shard, record: dict[str, Any]) -> ShardSink:
        return TorchZipWriter(folder / shard.filename, shard.specs)  # type: ignore[arg-type]

    def finish(self, plan: Plan, folder: Location, record: dict[str, Any]) -> None:
        for path in plan.base.companion_files:
            shutil.copy2(path, folder / path.name)
        write_provenance(folder, record)
