"""What every output writer provides, and the checks every output destination gets."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol

from ..engine import ShardSink
from ..errors import InputError
from ..io.locations import Location, location
from ..planner import Plan, Shard
from ..version import __version__

PROVENANCE_FILE = "lorastream.json"


class OutputWriter(Protocol):
    """An output format: how each shard the plan lays out is written, and what completes the folder.

    `name` is the `--format` value. `open_shard` gives the sink the engine streams a shard's tensors into (a
    file in the staging folder, written under a temporary name and renamed on commit); `finish` adds what
    makes the staged shards a model (index, config, tokenizer files, the provenance `record`) before the
    staging folder is promoted. `last` names the files a loader takes as the sign of a complete output: where
    promotion is not one rename (an object store), they are put in place last, in that order.
    """

    name: str
    last: tuple[str, ...]

    def open_shard(self, folder: Location, shard: Shard, record: dict[str, Any]) -> ShardSink: ...

    def finish(self, plan: Plan, folder: Location, record: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class Output:
    """One output of a merge pass: its plan, its writer, what it records, and the job id its staging is
    resumed by. `destination` is the folder (or, for `lit_model.pth` beside a LitGPT run, the file) it
    replaces."""

    plan: Plan
    writer: OutputWriter
    record: dict[str, Any]
    key: str
    destination: Location

    @property
    def single_file(self) -> bool:
        """The output is one file (GGUF; lit_model.pth beside a LitGPT run), promoted by one rename."""
        return self.destination != self.plan.out_dir or getattr(self.writer, "single_file", False)


def check_destination(out_dir: Location, overwrite: bool, single_file: bool = False) -> None:
    """Refuse to replace an existing non-empty folder (or, for a single-file format, a file) unless asked to. A
    folder lorastream wrote is left to `check_rerun`, once the job is planned: it may hold this very job's output."""
    if single_file:
        if out_dir.is_dir():
            raise InputError(f"{out_dir}: is a folder; the output is one file")
        if out_dir.exists() and not overwrite:
            raise InputError(f"{out_dir}: file exists; pass --overwrite to replace it")
        return
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite and not (out_dir / PROVENANCE_FILE).is_file():
        raise InputError(f"{out_dir}: folder exists and is not empty; pass --overwrite to replace it")


def is_up_to_date(output: Output) -> bool:
    """Whether the destination already holds this output: its provenance names the same job (inputs, their
    sizes and times, the options that shape the output, lorastream's version) and every shard it lists is
    there at its recorded size."""
    folder = output.destination
    try:
        record = json.loads((folder / PROVENANCE_FILE).read_text())
        return (isinstance(record, dict) and record.get("job") == output.key and all(
            (folder / name).stat().st_size == info["size"] for name, info in record["shards"].items()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def check_rerun(output: Output, overwrite: bool) -> bool:
    """True when the destination already holds this output (nothing to do); refuses one that holds another,
    unless `overwrite`."""
    folder = output.destination
    if overwrite or output.single_file or not folder.is_dir() or not any(folder.iterdir()):
        return False
    if is_up_to_date(output):
        return True
    raise InputError(f"{folder}: folder exists and is not empty (written by another merge: other inputs or "
                     "options); pass --overwrite to replace it")


def provenance(plan: Plan, options: dict[str, Any]) -> dict[str, Any]:
    """The record of what produced an output: lorastream's version, the inputs, the options."""
    return {"producer": "lorastream", "version": __version__, "base": str(plan.base.path.absolute()),
            "adapters": [{"path": str(location(a.source).absolute()), "weight": w} for a, w in plan.adapters],
            "options": options}


def write_provenance(folder: Location, record: dict[str, Any]) -> None:
    (folder / PROVENANCE_FILE).write_text(json.dumps(record, indent=2) + "\n")


def safetensors_metadata(record: dict[str, Any]) -> dict[str, str]:
    """The metadata every safetensors shard carries: torch's format tag and the provenance record."""
    return {"format": "pt", "lorastream": json.dumps(record, separators=(",", ":"))}
