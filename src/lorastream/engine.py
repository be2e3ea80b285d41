"""Executes a plan: the only place that moves weight bytes.

Each output tensor is produced in row blocks sized by the plan: read rows into a reused buffer, decode to
float32, add every LoRA delta for those rows, apply DoRA, round once into the output dtype, append to the
shard being written. Tensors that pass through unchanged are copied inside the kernel.
"""

from __future__ import annotations

import errno
import math
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import InputError, ResourceError
from .formats.safetensors import ShardWriter, TensorSpec
from .formats.tensor_ref import TensorRef
from .memory import format_size
from .planner import MIN_BLOCK_ROWS, Delta, OutputTensor, Plan

Progress = Callable[[int], None]
# Chunk for copying unchanged tensors through user space when the kernel cannot copy between the files.
COPY_CHUNK = 1 << 20


def row_blocks(rows: int, block_rows: int, align: int = 1) -> Iterator[tuple[int, int]]:
    """Split [0, rows) into blocks of at most `block_rows` rows, each starting at a multiple of `align` and,
    unless the tensor is one block, at least MIN_BLOCK_ROWS rows long (a short tail borrows rows from the
    block before it). The planner guarantees `block_rows >= 2 * (MIN_BLOCK_ROWS + align)` whenever a tensor
    has more rows than that."""
    if rows <= block_rows:
        yield 0, rows
        return
    block_rows -= block_rows % align
    assert block_rows >= 2 * MIN_BLOCK_ROWS + align, "the planner sizes blocks above 2 * MIN_BLOCK_ROWS + align"
    full, tail = divmod(rows, block_rows)
    stops = [block_rows * (i + 1) for i in range(full)]
    if tail:
        stops.append(rows)
        if tail < MIN_BLOCK_ROWS:
            cut = rows - MIN_BLOCK_ROWS
            stops[-2] = cut - cut % align
    start = 0
    for stop in stops:
        yield start, stop
        start = stop


class _Buffers:
    """The reused row-block buffers whose total the memory plan budgets."""

    def __init__(self, plan: Plan):
        elements = plan.memory.block_elements
        decoded = [t for t in plan.tensors if not t.is_copy] or list(plan.tensors)
        self.elements = elements
        stored = max(math.ceil(t.source.stored_bytes / max(1, t.source.numel)) for t in decoded)
        self.raw_in = bytearray(max(COPY_CHUNK, elements * stored))
        self.raw_out = bytearray(elements * max(t.dtype.itemsize for t in decoded))
        needs_fp32 = any(t.needs_fp32 for t in decoded)
        self.work = torch.empty(elements if needs_fp32 else 0, dtype=torch.float32)
        self.delta = torch.empty(elements if needs_fp32 else 0, dtype=torch.float32)

    def output(self, dtype: torch.dtype, shape: tuple[int, int]) -> torch.Tensor:
        return torch.frombuffer(self.raw_out, dtype=dtype, count=shape[0] * shape[1]).view(shape)


@dataclass
class _LoadedDelta:
    a: torch.Tensor
    b: torch.Tensor
    scale: float
    transposed: bool

    @classmethod
    def load(cls, delta: Delta) -> _LoadedDelta:
        return cls(delta.lora.a.read().float(), delta.lora.b.read().float(), delta.scale, delta.transposed)

    def add_rows(self, work: torch.Tensor, scratch: torch.Tensor, start: int, stop: int) -> None:
        """work += scale · (B @ A)[start:stop] (or its transpose), computed as PEFT does: matmul, then scale."""
        rows, cols = work.shape
        if self.transposed:
            product = torch.mm(self.b, self.a[:, start:stop], out=scratch[: rows * cols].view(cols, rows)).T
        else:
            product = torch.mm(self.b[start:stop], self.a, out=scratch[: rows * cols].view(rows, cols))
        product.mul_(self.scale)
        work.add_(product)


class _TensorMerger:
    """Computes one output tensor block by block and streams its bytes to a shard writer."""

    def __init__(self, tensor: OutputTensor, buffers: _Buffers, writer: ShardWriter, progress: Progress):
        self.t, self.buf, self.writer, self.progress = tensor, buffers, writer, progress
        self.cols = tensor.row_elements
        self.block_rows = max(1, buffers.elements // max(1, self.cols))

    def run(self) -> None:
        if self.t.source.numel == 0:
            return
        if self.t.is_copy:
            self._copy()
            return
        deltas = [_LoadedDelta.load(d) for d in self.t.deltas]
        magnitude = self.t.magnitude.read().float() if self.t.magnitude is not None else None
        column_factors = None
        if magnitude is not None and deltas[0].transposed:
            column_factors = (magnitude / self._column_norms(deltas)).view(1, -1)
        for start, stop in self._blocks():
            shape = (stop - start, self.cols)
            out = self.buf.output(self.t.dtype, shape)
            if self.t.needs_fp32:
                work = self._decode(start, stop, deltas)
                if column_factors is not None:
                    work.mul_(column_factors)
                elif magnitude is not None:  # DoRA on [out, in]: one norm per row, as PEFT computes it
                    work.mul_((magnitude[start:stop] / torch.linalg.norm(work, dim=1)).view(-1, 1))
                out.copy_(work)
            else:
                out.copy_(self._read(start, stop))
            nbytes = shape[0] * shape[1] * self.t.dtype.itemsize
            self.writer.write(memoryview(self.buf.raw_out)[:nbytes])
            self.progress(nbytes)

    def _blocks(self) -> Iterator[tuple[int, int]]:
        return row_blocks(self.t.rows, self.block_rows, self.t.source.row_alignment)

    def _copy(self) -> None:
        """Unchanged bytes: copied inside the kernel, else through the input buffer in chunks."""
        src = self.t.source
        assert isinstance(src, TensorRef)
        fd = os.open(src.path, os.O_RDONLY)
        try:
            if not self.writer.copy_from(fd, src.offset, src.nbytes):
                buffer = memoryview(self.buf.raw_in)
                for start in range(0, src.nbytes, len(buffer)):
                    count = min(len(buffer), src.nbytes - start)
                    if os.preadv(fd, [buffer[:count]], src.offset + start) != count:
                        raise InputError(f"{src.path}: tensor {src.name!r} ends past the end of the file")
                    self.writer.write(buffer[:count])
        finally:
            os.close(fd)
        self.progress(src.nbytes)

    def _read(self, start: int, stop: int) -> torch.Tensor:
        return self.t.source.read_rows(start, stop, memoryview(self.buf.raw_in))

    def _decode(self, start: int, stop: int, deltas: list[_LoadedDelta]) -> torch.Tensor:
        """Rows [start, stop) of the source plus every delta, in float32."""
        source = self._read(start, stop)
        if self.t.is_replacement:
            # PEFT loads a replacement into the model's parameter, in the model's dtype, before merging;
            # the output buffer is free until the block is encoded.
            source = self.buf.output(self.t.dtype, source.shape).copy_(source)
        work = self.buf.work[: source.numel()].view(source.shape)
        work.copy_(source)
        for delta in deltas:
            delta.add_rows(work, self.buf.delta, start, stop)
        for ref, scale in self.t.bias_deltas:
            work.add_(ref.read().float().reshape(work.shape) * scale)
        return work

    def _column_norms(self, deltas: list[_LoadedDelta]) -> torch.Tensor:
        """DoRA norms of a transposed weight ([in, out]): one per column, so over every row block.

        A tensor that fits one block gets PEFT's exact `linalg.norm`; larger ones accumulate squares in
        float64 over a first pass (within float32 rounding of PEFT's value).
        """
        blocks = list(self._blocks())
        if len(blocks) == 1:
            return torch.linalg.norm(self._decode(0, self.t.rows, deltas).T, dim=1)
        squares = torch.zeros(self.cols, dtype=torch.float64)
        for start, stop in blocks:
            squares += self._decode(start, stop, deltas).double().square().sum(dim=0)
        return squares.sqrt().float()


def write_shards(plan: Plan, folder: Path, metadata: dict[str, str], progress: Progress) -> list[Path]:
    """Write every shard of `plan` into `folder`, each committed only when complete."""
    buffers = _Buffers(plan)
    written: list[Path] = []
    for shard in plan.shards:
        specs = [TensorSpec(t.name, t.dtype, t.shape) for t in shard.tensors]
        writer = ShardWriter(folder / shard.filename, specs, metadata)
        try:
            for tensor in shard.tensors:
                _TensorMerger(tensor, buffers, writer, progress).run()
            writer.commit()
        except OSError as exc:
            writer.abort()
            if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                free = shutil.disk_usage(folder).free
                raise ResourceError(f"{folder}: the disk filled while writing {shard.filename} ({exc.strerror}); "
                                    f"the output needs {format_size(plan.disk_needed)}, "
                                    f"{format_size(free)} is free now") from exc
            raise InputError(f"{getattr(exc, 'filename', None) or folder}: {exc.strerror or exc}") from exc
        except BaseException:
            writer.abort()
            raise
        written.append(folder / shard.filename)
    return written
