"""`verify`: recompute a merge block by block and compare it with a merged checkpoint on disk.

The engine produces the expected bytes exactly as `merge` would, into a comparator instead of a file, so
verification runs in the same memory budget and needs no second copy of the model.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .codecs.plain import TensorRef
from .engine import Progress, write_shards
from .errors import InputError, ResourceError
from .formats.hf import read_json
from .formats.safetensors import TensorSpec, read_header
from .memory import peak_rss
from .outputs.base import PROVENANCE_FILE
from .planner import Plan, describe_shortfall

# In tolerant mode, the allowed gap per element is one rounding step of the output dtype at the element's
# magnitude plus one at its row's largest magnitude: other tools' rounding order (PEFT rounds an embedding
# delta before adding it, which can cost a step of the delta, and |delta| <= |result| + |base|) stays within
# it. Exact mode, the default for lorastream's own outputs, requires identical bytes.


@dataclass
class TensorCheck:
    """How one stored tensor compares with its recomputation."""

    name: str
    dtype: str
    exact: bool
    elements: int = 0
    differing: int = 0
    mismatched: int = 0
    max_abs_diff: float = 0.0
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None and self.mismatched == 0 and not (self.exact and self.differing)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "elements": self.elements, "differing": self.differing,
                "beyond_tolerance": self.mismatched, "max_abs_diff": self.max_abs_diff, "problem": self.problem,
                "ok": self.ok}


def _compare_floats(expected: torch.Tensor, actual: torch.Tensor, columns: int) -> tuple[int, int, float]:
    """(elements differing, elements beyond tolerance, largest absolute difference) of two flat tensors."""
    exp, act = expected.float(), actual.float()
    both_nan = exp.isnan() & act.isnan()
    differing = int((exp != act).logical_and(~both_nan).sum())
    diff = (exp - act).abs().masked_fill(both_nan, 0)
    finite = torch.finfo(expected.dtype)
    magnitude = exp.abs().nan_to_num(0, posinf=0, neginf=0)
    rows = magnitude.view(-1, columns) if columns and magnitude.numel() % columns == 0 else magnitude.view(1, -1)
    scale = rows.amax(dim=1, keepdim=True).expand_as(rows).reshape(-1) if rows.numel() else magnitude
    beyond = int((diff > finite.eps * (magnitude + scale) + finite.tiny).sum())
    return differing, beyond, float(diff.max()) if diff.numel() else 0.0


class Comparator:
    """A shard sink that compares the bytes it receives with the same tensors of an existing checkpoint."""

    def __init__(self, specs: list[TensorSpec], merged: dict[str, TensorRef], checks: dict[str, TensorCheck],
                 exact: bool):
        self.specs, self.merged, self.checks = specs, merged, checks
        self.index, self.offset = 0, 0
        for spec in specs:
            checks[spec.name] = TensorCheck(spec.name, str(spec.dtype).removeprefix("torch."), exact)
            ref = merged.get(spec.name)
            if ref is None:
                checks[spec.name].problem = "missing from the merged checkpoint"
            elif ref.dtype != spec.dtype or ref.shape != spec.shape:
                checks[spec.name].problem = (f"stored as {ref.dtype} {list(ref.shape)}, expected {spec.dtype} "
                                             f"{list(spec.shape)}")
        self._skip_empty()

    def _skip_empty(self) -> None:
        while self.index < len(self.specs) and self.specs[self.index].nbytes == 0:
            self.index += 1

    def write(self, chunk: memoryview | bytes) -> None:
        view = memoryview(chunk).cast("B")
        while view:
            spec = self.specs[self.index]
            part = view[: spec.nbytes - self.offset]
            self._compare(spec, self.offset, part)
            self.offset += len(part)
            view = view[len(part):]
            if self.offset == spec.nbytes:
                self.index, self.offset = self.index + 1, 0
                self._skip_empty()

    def _compare(self, spec: TensorSpec, offset: int, expected: memoryview) -> None:
        check = self.checks[spec.name]
        if check.problem is not None:
            return
        ref = self.merged[spec.name]
        raw = TensorRef(ref.name, torch.uint8, (ref.nbytes,), ref.path, ref.offset)
        stored = raw.read_elements_into(offset, len(expected), memoryview(bytearray(len(expected))))
        if expected.readonly:  # small statistics handed over as bytes; torch wants a writable buffer
            expected = memoryview(bytearray(expected))
        wanted = torch.frombuffer(expected, dtype=torch.uint8) if len(expected) else stored[:0]
        itemsize = spec.dtype.itemsize
        check.elements += len(expected) // itemsize
        if torch.equal(stored, wanted):
            return
        if ".quant_state." in spec.name and offset == 0 and len(expected) == spec.nbytes:
            same = json.loads(bytes(expected)) == json.loads(bytes(stored.tolist()))  # padding may differ
            check.mismatched += not same
            return
        if spec.dtype.is_floating_point:
            columns = spec.shape[-1] if spec.shape and offset % (spec.shape[-1] * itemsize) == 0 else 0
            differing, beyond, diff = _compare_floats(wanted.view(spec.dtype), stored.view(spec.dtype), columns)
            check.differing += differing
            check.mismatched += beyond
            check.max_abs_diff = max(check.max_abs_diff, diff)
        else:
            differing = int((wanted.view(spec.dtype) != stored.view(spec.dtype)).sum())
            check.differing += differing
            check.mismatched += differing

    def copy_from(self, fd: int, offset: int, count: int) -> bool:
        return False  # unchanged bytes come through `write` so they are compared too

    def commit(self) -> None:
        if self.index != len(self.specs):
            raise AssertionError("the comparator received fewer bytes than the shard holds")

    def abort(self) -> None:
        pass


@dataclass(frozen=True)
class VerifyReport:
    checks: list[TensorCheck]
    unexpected: list[str]
    peak_rss: int
    budget: int

    @property
    def ok(self) -> bool:
        return not self.unexpected and all(c.ok for c in self.checks)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "tensors": [c.to_json() for c in self.checks], "unexpected": self.unexpected,
                "peak_rss": self.peak_rss, "budget": self.budget}



def compare(job: Plan, stored: dict[str, TensorRef], exact: bool, progress: Progress | None) -> VerifyReport:
    """Run the plan's merge into comparators against `stored` (the merged checkpoint's tensors)."""
    if not job.memory.fits:
        raise ResourceError(describe_shortfall(job) or "not enough memory")
    checks: dict[str, TensorCheck] = {}
    write_shards(job, lambda shard: Comparator(shard.specs, stored, checks, exact), progress or (lambda _n: None),
                 allow_nonfinite=True)
    return VerifyReport(list(checks.values()), sorted(set(stored) - set(checks)), peak_rss(), job.memory.budget)


def compare_generated(report: VerifyReport, stored: dict[str, TensorRef],
                      generated: list[tuple[str, np.ndarray]]) -> VerifyReport:
    """`report` with the tensors a GGUF holds that no merge computes (the rope factors the converter derives
    from config.json) compared byte for byte with their values from the base's config."""
    checks = []
    for name, values in generated:
        check = TensorCheck(name, "float32", True, elements=values.size)
        ref = stored.get(name)
        if ref is None or ref.dtype != torch.float32 or ref.shape != values.shape:
            check.problem = f"expected float32 {list(values.shape)}, as the base's config.json gives it"
        else:
            got = ref.read_elements_into(0, ref.numel, memoryview(bytearray(ref.nbytes)))
            check.differing = check.mismatched = int((got != torch.from_numpy(values)).sum())
        checks.append(check)
    return dataclasses.replace(report, checks=checks + report.checks,
                               unexpected=[n for n in report.unexpected if n not in dict(generated)])


def safetensors_tensors(folder: Path) -> dict[str, TensorRef]:
    """The tensors of every safetensors file in a merged folder."""
    stored: dict[str, TensorRef] = {}
    for path in sorted(folder.glob("*.safetensors")):
        stored.update(read_header(path).tensors)
    if not stored:
        raise InputError(f"{folder}: no safetensors files to verify")
    return stored


def recorded_options(merged: Path, names: tuple[str, ...]) -> dict[str, Any]:
    """The options `names` a merged folder's lorastream.json records (those set), for `verify` to reuse."""
    record = merged / PROVENANCE_FILE
    options = read_json(record).get("options", {}) if record.is_file() else {}
    return {n: options[n] for n in names if isinstance(options, dict) and options.get(n) is not None}
