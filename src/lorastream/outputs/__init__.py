"""Output writers, registered by their `--format` name.

Adding a format is one module here that defines a class with the `OutputWriter` interface (see
`outputs.base`: `name`, `open_shard(folder, shard, record)` giving the sink the engine streams each shard
into, `finish(plan, folder, record)` adding the other files before the folder is promoted) and one line in
`WRITERS` below. The pipeline stages, resumes and promotes every format the same way; an input family
(`inputs/`) decides which formats it can plan for. The GGUF writer, for instance, is `outputs/gguf.py` with
`class GGUFFile` (name "gguf", one file whose tensor order, names and encodings its `arrangement` decides).
"""

from __future__ import annotations

from ..errors import InputError
from ..planner import Plan
from .base import OutputWriter
from .gguf import GGUFFile
from .hf_folder import HFFolder
from .lit_model import LitModel

WRITERS: dict[str, OutputWriter] = {writer.name: writer for writer in (
    HFFolder(),
    LitModel(),
    GGUFFile(),
)}


def writer(name: str, plan: Plan | None = None) -> OutputWriter:
    """The writer of `--format name`; a GGUF's carries the bytes `plan` was laid out with (its header)."""
    if name not in WRITERS:
        raise InputError(f"--format {name!r}: expected one of {', '.join(WRITERS)}")
    if name == GGUFFile.name and plan is not None:
        return GGUFFile(plan.fixed_bytes)
    return WRITERS[name]
