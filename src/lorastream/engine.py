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
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import torch

from .errors import InputError, ResourceError
from .formats.tensor_ref import TensorRef
from .memory import format_size, keep_heap_bounded
from .planner import MIN_BLOCK_ROWS, Delta, OutputTensor, Plan, Shard

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
        self.raw_in = bytearray(elements * stored)
        self.out_bytes = elements * max(max(t.dtype.itemsize for t in decoded), 1)
        needs_fp32 = any(t.needs_fp32 for t in decoded)
        self.work = torch.empty(elements if needs_fp32 else 0, dtype=torch.float32)
        self.delta = torch.empty(elements if needs_fp32 else 0, dtype=torch.float32)



def _view(buffer: bytearray, dtype: torch.dtype, shape: tuple[int, int]) -> torch.Tensor:
    return torch.frombuffer(buffer, dtype=dtype, count=shape[0] * shape[1]).view(shape)


class _WriteBehind:
    """Appends to the shard on a background thread while the next block is computed.

    Two output buffers alternate; a buffer is handed out again only once its previous write is done, so
    exactly two output blocks are ever in flight (the planner budgets both). Tasks run in submission
    order on one thread, so the file is written sequentially.
    """

    def __init__(self, out_bytes: int):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorastream-writer")
        self._buffers = [bytearray(out_bytes), bytearray(out_bytes)]
        self._pending: list[Future[None] | None] = [None, None]
        self._turn = 0
        self._copy_chunk = bytearray(COPY_CHUNK)
        self._outstanding: list[Future[None]] = []

    def next_buffer(self) -> bytearray:
        pending = self._pending[self._turn]
        if pending is not None:
            pending.result()
        return self._buffers[self._turn]

    def write(self, writer: ShardSink, nbytes: int) -> None:
        """Write the first `nbytes` of the buffer `next_buffer` returned."""
        future = self._submit(writer.write, memoryview(self._buffers[self._turn])[:nbytes])
        self._pending[self._turn] = future
        self._turn ^= 1

    def write_bytes(self, writer: ShardSink, data: bytes | bytearray) -> None:
        """Append bytes the caller will not touch again (statistics computed after a tensor's blocks)."""
        self._submit(writer.write, data)

    def copy(self, writer: ShardSink, src: TensorRef) -> None:
        """Append an unchanged tensor: inside the kernel, else through a chunk buffer of this thread's own."""
        self._submit(self._copy, writer, src)

    def _copy(self, writer: ShardSink, src: TensorRef) -> None:
        fd = os.open(src.path, os.O_RDONLY)
        try:
            if writer.copy_from(fd, src.offset, src.nbytes):
                return
            chunk = memoryview(self._copy_chunk)
            for start in range(0, src.nbytes, len(chunk)):
                count = min(len(chunk), src.nbytes - start)
                if os.preadv(fd, [chunk[:count]], src.offset + start) != count:
                    raise InputError(f"{src.path}: tensor {src.name!r} ends past the end of the file")
                writer.write(chunk[:count])
        finally:
            os.close(fd)

    def _submit(self, fn: Callable[..., None], *args: object) -> Future[None]:
        self._outstanding = [f for f in self._outstanding if not f.done() or f.exception() is not None]
        future = self._pool.submit(fn, *args)
        self._outstanding.append(future)
        return future

    def commit(self, writer: ShardSink, then: Callable[[], None]) -> None:
        """Commit the shard once its writes are done, then run `then`, both on the writer thread."""

        def commit_and_record() -> None:
            writer.commit()
            then()

        self._submit(commit_and_record)

    def drain(self) -> None:
        """Wait for every submitted write; raise the first failure."""
        outstanding, self._outstanding = self._outstanding, []
        self._pending = [None, None]
        for future in outstanding:
            future.result()

    def close(self) -> None:
        """Finish what was submitted (earlier shards' commits stay useful for a resume), then stop."""
        self._pool.shutdown(wait=True)


@dataclass
class _LoadedDelta:
    a: torch.Tensor
    b: torch.Tensor
    scale: float
    transposed: bool

    row_offset: int | None

    @classmethod
    def load(cls, delta: Delta) -> _LoadedDelta:
        lora = delta.lora
        dtype = lora.compute_dtype or torch.float32
        return cls(lora.a.read().to(dtype), lora.b.read().to(dtype), delta.scale, delta.transposed, lora.row_offset)

    def add_rows(self, work: torch.Tensor, scratch: torch.Tensor, start: int, stop: int) -> None:
        """work += scale · (B @ A)[start:stop] (or its transpose), computed as PEFT does: matmul, then scale,
        each rounded to the dtype of A and B (the module's compute dtype)."""
        if self.row_offset is not None:
            self._add_part_rows(work, scratch, start, stop)
            return
        rows, cols = work.shape
        if self.transposed:
            product = torch.mm(self.b, self.a[:, start:stop],
                               out=scratch.view(self.a.dtype)[: rows * cols].view(cols, rows)).T
        else:
            product = torch.mm(self.b[start:stop], self.a,
                               out=scratch.view(self.a.dtype)[: rows * cols].view(rows, cols))
        product.mul_(self.scale)
        work.add_(product)

    def _add_part_rows(self, work: torch.Tensor, scratch: torch.Tensor, start: int, stop: int) -> None:
        """The update covers rows [row_offset, row_offset + B.rows) of the base only: add its overlap with the
        block. The product is taken over at least MIN_BLOCK_ROWS rows of B, so a sliver of a part computes with
        the kernel (and rounding) the whole part's product has."""
        offset, part_rows = self.row_offset or 0, self.b.shape[0]
        low, high = max(start, offset), min(stop, offset + part_rows)
        if low >= high:
            return
        first = max(offset, min(low, offset + part_rows - MIN_BLOCK_ROWS))
        last = max(high, min(first + MIN_BLOCK_ROWS, offset + part_rows))
        rows, cols = last - first, work.shape[1]
        product = torch.mm(self.b[first - offset:last - offset], self.a,
                           out=scratch.view(self.a.dtype)[: rows * cols].view(rows, cols))
        product.mul_(self.scale)
        work[low - start:high - start].add_(product[low - first:high - first])


class _TensorMerger:
    """Computes one output tensor block by block and streams its bytes to a shard writer."""

    def __init__(self, tensor: OutputTensor, buffers: _Buffers, out: _WriteBehind, writer: ShardSink,
                 progress: Progress, allow_nonfinite: bool = False):
        self.t, self.buf, self.out, self.writer, self.progress = tensor, buffers, out, writer, progress
        self.allow_nonfinite = allow_nonfinite
        self.cols = tensor.row_elements
        self.block_rows = max(1, buffers.elements // max(1, self.cols))

    def run(self) -> None:
        if self.t.source.numel == 0:
            return
        if self.t.is_copy:
            assert isinstance(self.t.source, TensorRef)
            self.out.copy(self.writer, self.t.source)
            self.progress(self.t.source.nbytes)
            return
        deltas = [_LoadedDelta.load(d) for d in self.t.deltas]
        magnitude = self.t.magnitude.read().float() if self.t.magnitude is not None else None
        column_factors = None
        if magnitude is not None and deltas[0].transposed:
            column_factors = (magnitude / self._column_norms(deltas)).view(1, -1)
        encoder = self.t.encoding.encoder(self.t.shape) if self.t.encoding is not None else None
        for start, stop in self._blocks():
            shape = (stop - start, self.cols)
            buffer = self.out.next_buffer()
            if not self.t.needs_fp32:
                out = _view(buffer, self.t.dtype, shape)
                out.copy_(self._read(start, stop))
                nbytes = out.numel() * out.element_size()
            else:
                work = self._decode(start, stop, deltas)
                if column_factors is not None:
                    work.mul_(column_factors)
                elif magnitude is not None:  # DoRA on [out, in]: one norm per row, as PEFT computes it
                    work.mul_((magnitude[start:stop] / torch.linalg.norm(work, dim=1)).view(-1, 1))
                # a block's sum is finite unless it holds NaN/Inf (or overflows, which the exact test rules out)
                if not (self.allow_nonfinite or math.isfinite(work.sum().item()) or torch.isfinite(work).all()):
                    raise InputError(f"{self.t.source.path}: merged tensor {self.t.name!r} has NaN or Inf values "
                                     f"(rows {start}-{stop}); the adapter or base is broken. Pass "
                                     "--allow-nonfinite to keep them")
                if encoder is not None:
                    nbytes = encoder.encode(work, torch.frombuffer(buffer, dtype=torch.uint8))
                else:
                    out = _view(buffer, self.t.dtype, shape)
                    out.copy_(work)
                    nbytes = out.numel() * out.element_size()
            self.out.write(self.writer, nbytes)
            self.progress(nbytes)
        if encoder is not None:
            for data in encoder.statistics():
                self.out.write_bytes(self.writer, data)
                self.progress(len(data))

    def _blocks(self) -> Iterator[tuple[int, int]]:
        return row_blocks(self.t.rows, self.block_rows, self.t.row_alignment)

    def _read(self, start: int, stop: int) -> torch.Tensor:
        return self.t.source.read_rows(start, stop, memoryview(self.buf.raw_in))

    def _decode(self, start: int, stop: int, deltas: list[_LoadedDelta]) -> torch.Tensor:
        """Rows [start, stop) of the source plus every delta, in float32."""
        source = self._read(start, stop)
        if self.t.is_replacement:
            # PEFT loads a replacement into the model's parameter, in the model's dtype, before merging;
            # the output buffer is free until the block is encoded.
            source = _view(self.out.next_buffer(), self.t.dtype, source.shape).copy_(source)
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


class ShardSink(Protocol):
    """Where a shard's bytes go: a `ShardWriter`, or the comparator `verify` uses."""

    def write(self, chunk: memoryview | bytes) -> None: ...

    def copy_from(self, fd: int, offset: int, count: int) -> bool: ...

    def commit(self) -> None: ...

    def abort(self) -> None: ...


def write_shards(plan: Plan, open_sink: Callable[[Shard], ShardSink], progress: Progress, *,
                 finished: set[str] = frozenset(),
                 on_committed: Callable[[str, int, int], None] = lambda _name, _size, _crc: None,
                 allow_nonfinite: bool = False) -> None:
    """Produce every shard of `plan` not in `finished` into the sink `open_sink` gives for it.

    Each shard is committed (for a file: fsynced, renamed) on the writer thread once its last block is
    written, then `on_committed(filename, size, crc32)` runs there too (for sinks that are files), while the
    next shard is already being computed.
    """
    keep_heap_bounded()
    buffers = _Buffers(plan)
    out = _WriteBehind(buffers.out_bytes)
    try:
        for shard in plan.shards:
            if shard.filename in finished:
                progress(shard.nbytes)
                continue
            writer = open_sink(shard)
            try:
                for tensor in shard.tensors:
                    _TensorMerger(tensor, buffers, out, writer, progress, allow_nonfinite).run()
                out.commit(writer, lambda name=shard.filename, sink=writer: on_committed(
                    name, getattr(sink, "size", 0), getattr(sink, "crc32", 0)))
            except BaseException:
                out.close()  # no write may touch the file once it is aborted
                writer.abort()
                raise
        out.drain()
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            free = shutil.disk_usage(plan.out_dir.parent).free
            raise ResourceError(f"{plan.out_dir}: the disk filled while writing the output ({exc.strerror}); it needs "
                                f"{format_size(plan.disk_needed)} in all, {format_size(free)} is free now") from exc
        raise
    finally:
        out.close()
