"""Executes plans: the only place that moves weight bytes.

Each output tensor is produced in row blocks sized by the plan: a reader thread reads the next block into
one of two reused buffers while the current one is merged; the block is decoded to float32, every LoRA delta
for those rows is added, DoRA applied, the result rounded once into the output dtype and handed to a writer
thread that appends it to the shard. Tensors that pass through unchanged are copied inside the kernel.

Several plans over the same base (one per adapter, `merge --each`) run in one pass: each row block is read
and decoded once and merged into every output that reads it.
"""

from __future__ import annotations

import errno
import math
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import torch

from .codecs import Source
from .codecs.plain import BUFFER_SLACK, TensorRef
from .device import CPU, Accelerator
from .errors import InputError, ResourceError
from .io.locations import RemotePath
from .lora_product import lora_mm, upcast
from .memory import format_size, keep_heap_bounded
from .planner import MIN_BLOCK_ROWS, Delta, OutputTensor, Plan, Shard, layout

Progress = Callable[[int], None]
# The reader and writer threads each keep about one core busy (pread, write, CRC-32).
BACKGROUND_THREADS = 2
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


def _view(buffer: bytearray, dtype: torch.dtype, shape: tuple[int, int]) -> torch.Tensor:
    return torch.frombuffer(buffer, dtype=dtype, count=shape[0] * shape[1]).view(shape)


def _typed(raw: torch.Tensor, dtype: torch.dtype, shape: tuple[int, int]) -> torch.Tensor:
    """The start of a byte tensor seen as a `dtype` block of `shape`."""
    return raw[: shape[0] * shape[1] * dtype.itemsize].view(dtype).view(shape)


Read = tuple[Source, int, int]


class _ReadAhead:
    """Reads row blocks on a background thread, one block ahead of the merge (into the next tensor too).

    Every block the merge will read is known before it starts, so the reader never waits to be told. Two
    input buffers alternate: the read of block i + 1 starts when block i is taken, into the buffer block
    i - 1 used, which the merge is done with by then (it takes blocks strictly in order). `pread` and
    torch's decoding release the GIL, so reading overlaps the merge. Blocks are decoded on `device`, where the
    merge computes.
    """

    def __init__(self, reads: Iterator[Read], in_bytes: int, device: torch.device, threads: int):
        self._reads, self._device = reads, device
        self._buffers = [bytearray(in_bytes), bytearray(in_bytes)]
        self._turn = 0
        # the reader decodes with the merge's thread count, not whatever torch's lazy per-thread set-up finds
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorastream-reader",
                                        initializer=torch.set_num_threads, initargs=(threads,))
        self._ahead: tuple[Read, Future[torch.Tensor]] | None = None
        self._start_next()

    def _start_next(self) -> None:
        read = next(self._reads, None)
        if read is None:
            self._ahead = None
            return
        source, start, stop = read
        buffer = memoryview(self._buffers[self._turn])
        self._turn ^= 1
        self._ahead = (read, self._pool.submit(source.read_rows, start, stop, buffer, self._device))

    def take(self, source: Source, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of `source`, which must be the next read of the schedule."""
        assert self._ahead is not None, "read past the schedule"
        (expected, low, high), future = self._ahead
        assert expected is source and (low, high) == (start, stop), "reads out of schedule"
        rows = future.result()
        self._start_next()
        return rows

    def close(self) -> None:
        if self._ahead is not None:
            self._ahead[1].cancel()
        self._pool.shutdown(wait=True)


class _WriteBehind:
    """Appends to the shards on background threads while the next blocks are computed.

    `count` output buffers are used in turn; a buffer is handed out again only once its previous write is
    done, so at most `count` output blocks are ever in flight (the planner budgets them all). Each output
    has a lane, one thread running its tasks in submission order, so every file is written sequentially and
    an output's commits (and staging records) never race; the lanes of several outputs write (and compute
    their CRC-32) side by side.
    """

    def __init__(self, out_bytes: int, count: int, lanes: int = 1):
        self._lanes = [ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"lorastream-writer-{lane}")
                       for lane in range(lanes)]
        self._buffers = [bytearray(out_bytes) for _ in range(count)]
        self._pending: list[Future[None] | None] = [None] * count
        self._turn = 0
        self._outstanding: list[Future[None]] = []

    def next_buffer(self) -> bytearray:
        pending = self._pending[self._turn]
        if pending is not None:
            pending.result()
        return self._buffers[self._turn]

    def write(self, lane: int, writer: ShardSink, nbytes: int, encode: Callable[[], object] | None = None) -> None:
        """Write the first `nbytes` of the buffer `next_buffer` returned; first, on the lane's thread, `encode` it
        when given (an encoding left to run beside the next block's merge)."""
        view = memoryview(self._buffers[self._turn])[:nbytes]

        def encode_and_write() -> None:
            if encode is not None:
                encode()
            writer.write(view)

        future = self._submit(lane, encode_and_write)
        self._pending[self._turn] = future
        self._turn = (self._turn + 1) % len(self._buffers)

    def write_bytes(self, lane: int, writer: ShardSink, data: bytes | bytearray) -> None:
        """Append bytes the caller will not touch again (statistics computed after a tensor's blocks)."""
        self._submit(lane, writer.write, data)

    def copy(self, lane: int, writer: ShardSink, src: TensorRef) -> None:
        """Append an unchanged tensor: inside the kernel, else through a chunk buffer."""
        self._submit(lane, self._copy, writer, src)

    def _copy(self, writer: ShardSink, src: TensorRef) -> None:
        if isinstance(src.path, RemotePath):  # no file descriptor: ranged reads
            self._copy_chunks(writer, src, src.path.read_into)
            return
        fd = os.open(src.path, os.O_RDONLY)
        try:
            if not writer.copy_from(fd, src.offset, src.nbytes):
                self._copy_chunks(writer, src, lambda offset, view: os.preadv(fd, [view], offset))
        finally:
            os.close(fd)

    def _copy_chunks(self, writer: ShardSink, src: TensorRef, read: Callable[[int, memoryview], int]) -> None:
        """Through a chunk buffer, where the kernel cannot copy from the source to the sink."""
        chunk = memoryview(bytearray(COPY_CHUNK))
        for start in range(0, src.nbytes, len(chunk)):
            count = min(len(chunk), src.nbytes - start)
            if read(src.offset + start, chunk[:count]) != count:
                raise InputError(f"{src.path}: tensor {src.name!r} ends past the end of the file")
            writer.write(chunk[:count])

    def _submit(self, lane: int, fn: Callable[..., None], *args: object) -> Future[None]:
        self._outstanding = [f for f in self._outstanding if not f.done() or f.exception() is not None]
        future = self._lanes[lane].submit(fn, *args)
        self._outstanding.append(future)
        return future

    def commit(self, lane: int, writer: ShardSink, then: Callable[[], None]) -> None:
        """Commit the shard once its writes are done, then run `then`, both on its lane's thread."""

        def commit_and_record() -> None:
            writer.commit()
            then()

        self._submit(lane, commit_and_record)

    def drain(self) -> None:
        """Wait for every submitted write; raise the first failure."""
        outstanding, self._outstanding = self._outstanding, []
        self._pending = [None] * len(self._pending)
        for future in outstanding:
            future.result()

    def close(self) -> None:
        """Finish what was submitted (earlier shards' commits stay useful for a resume), then stop."""
        for lane in self._lanes:
            lane.shutdown(wait=True)


@dataclass
class _LoadedDelta:
    a: torch.Tensor
    b: torch.Tensor
    scale: float
    transposed: bool
    row_offset: int | None
    round_to: torch.dtype | None = None  # PEFT's ParamWrapper casts its update to the weight's dtype before adding it
    a32: torch.Tensor | None = None  # the factors in float32 for `lora_mm`, made once rather than per block
    b32: torch.Tensor | None = None

    @classmethod
    def load(cls, delta: Delta, device: torch.device, weight_dtype: torch.dtype) -> _LoadedDelta:
        lora = delta.lora
        dtype = lora.compute_dtype or torch.float32
        a, b = lora.a.read(), lora.b.read()
        if lora.expert is not None:  # PEFT's layout of every expert's factors: A [e·r + j, in], B [out, j·E + e]
            a = a.view(lora.experts, -1, a.shape[-1])[lora.expert]
            b = b.view(b.shape[0], -1, lora.experts)[:, :, lora.expert]
        if lora.out_rows is not None:
            b = b[lora.out_rows[0]:lora.out_rows[1]]
        round_to = weight_dtype if lora.parameter is not None and weight_dtype != torch.float32 else None
        a, b = a.to(device, dtype).contiguous(), b.to(device, dtype).contiguous()
        return cls(a, b, delta.scale, delta.transposed, lora.row_offset, round_to, upcast(a), upcast(b))

    def _scaled(self, product: torch.Tensor) -> torch.Tensor:
        product.mul_(self.scale)
        if self.round_to is not None:
            product.copy_(product.to(self.round_to))
        return product

    def _product(self, scratch: torch.Tensor, first: int, last: int) -> torch.Tensor:
        """Rows [first, last) of `scale · (B @ A)` (or of its transpose), computed as PEFT does: matmul, then
        scale, each rounded to the dtype of A and B (the module's compute dtype)."""
        rows = last - first
        if self.transposed:
            cols = self.b.shape[0]
            product = lora_mm(self.b, self.a[:, first:last], scratch.view(self.a.dtype)[: rows * cols].view(cols, rows),
                              self.b32, None if self.a32 is None else self.a32[:, first:last]).T
        else:
            cols = self.a.shape[1]
            product = lora_mm(self.b[first:last], self.a, scratch.view(self.a.dtype)[: rows * cols].view(rows, cols),
                              None if self.b32 is None else self.b32[first:last], self.a32)
        return self._scaled(product)

    def add_rows(self, work: torch.Tensor, scratch: torch.Tensor, start: int, stop: int) -> None:
        """work += the update's rows [start, stop)."""
        if self.row_offset is None:
            _accumulate(work, self._product(scratch, start, stop))
            return
        self._add_part_rows(work, scratch, start, stop)

    def _add_part_rows(self, work: torch.Tensor, scratch: torch.Tensor, start: int, stop: int) -> None:
        """The update covers rows [row_offset, row_offset + its rows) of the base only (a part of a fused weight, one
        expert of a fused-experts tensor): add its overlap with the block. The product is taken over at least
        MIN_BLOCK_ROWS rows, so a sliver of a part computes with the kernel (and rounding) the whole part's
        product has."""
        offset = self.row_offset or 0
        part_rows = self.a.shape[1] if self.transposed else self.b.shape[0]
        low, high = max(start, offset), min(stop, offset + part_rows)
        if low >= high:
            return
        first = max(offset, min(low, offset + part_rows - MIN_BLOCK_ROWS))
        last = max(high, min(first + MIN_BLOCK_ROWS, offset + part_rows))
        product = self._product(scratch, first - offset, last - offset)
        _accumulate(work[low - start:high - start], product[low - first:high - first])


# A float32 += bfloat16 (or float16) add on the CPU first converts the whole operand into a temporary. Row chunks
# of at most this many elements keep that temporary under glibc's lowered mmap threshold (`keep_heap_bounded`):
# reused heap memory rather than fresh pages for every block, whose page faults cost 7x the add itself.
_MIXED_ADD_ELEMENTS = 1 << 15


def _accumulate(work: torch.Tensor, product: torch.Tensor) -> None:
    """work += product, rows [n, n + step) at a time when the dtypes differ on the CPU."""
    if product.dtype == work.dtype or work.device.type != "cpu":
        work.add_(product)
        return
    step = max(1, _MIXED_ADD_ELEMENTS // max(1, work.shape[1]))
    for row in range(0, work.shape[0], step):
        work[row:row + step].add_(product[row:row + step])


class _Work:
    """Where a merge computes: the float32 merged rows and the scratch a LoRA product goes to, on the CPU or
    on the accelerator, which also holds the encoded block until it is copied to the host's output buffer."""

    def __init__(self, elements: int, out_bytes: int, accelerator: Accelerator | None):
        self.accelerator = accelerator
        self.device = accelerator.device if accelerator is not None else CPU
        self.work = torch.empty(elements, dtype=torch.float32, device=self.device)
        self.delta = torch.empty(elements, dtype=torch.float32, device=self.device)
        self.staging = (torch.empty(out_bytes, dtype=torch.uint8, device=self.device) if accelerator is not None
                        else None)


@dataclass
class _Target:
    """One output of a tensor position: which plan it belongs to and the tensor it computes there."""

    output: int
    tensor: OutputTensor


class _TensorMerger:
    """Computes one tensor position for every output reading the same source, block by block: each block is
    read and decoded once, then merged into each output in turn and streamed to that output's shard."""

    def __init__(self, targets: list[_Target], block_elements: int, allow_nonfinite: bool):
        self.targets, self.allow_nonfinite = targets, allow_nonfinite
        self.t = targets[0].tensor  # the source, shape, blocks and dtype are the same for every target
        self.cols = self.t.row_elements
        self.block_rows = max(1, block_elements // max(1, self.cols))

    def _blocks(self) -> list[tuple[int, int]]:
        return list(row_blocks(self.t.rows, self.block_rows, self.t.row_alignment))

    def reads(self) -> Iterator[Read]:
        """Every block `run` reads, in order: a first pass per transposed DoRA target, then the merge."""
        if self.t.source.numel == 0:
            return
        passes = 1 + sum(t.tensor.magnitude is not None and t.tensor.deltas[0].transposed for t in self.targets)
        for _ in range(passes):
            for start, stop in self._blocks():
                yield self.t.source, start, stop

    def run(self, reader: _ReadAhead, work: _Work, out: _WriteBehind, sinks: dict[int, ShardSink],
            progress: Progress) -> None:
        if self.t.source.numel == 0:
            return
        self.reader, self.buf, self.out = reader, work, out
        merges = [_TargetMerge(target, sinks[target.output], self) for target in self.targets]
        for merge in merges:
            if merge.needs_column_norms and merge.magnitude is not None:
                merge.column_factors = (merge.magnitude / merge.column_norms()).view(1, -1)
        for start, stop in self._blocks():
            rows = self.read(start, stop)
            for merge in merges:
                progress(merge.write_block(rows, start, stop))
        for merge in merges:
            for data in merge.statistics():
                out.write_bytes(merge.lane, merge.sink, data)
                progress(len(data))

    def read(self, start: int, stop: int) -> torch.Tensor:
        """The block's source rows on the compute device, as PEFT sees them: a replacement is first loaded into
        the model's dtype (here into the host's output buffer, which is free until the block is encoded)."""
        source = self.reader.take(self.t.source, start, stop)
        if self.t.is_replacement:
            assert len(self.targets) == 1, "an adapter's own tensor belongs to its output only"
            source = _view(self.out.next_buffer(), self.t.dtype, source.shape).copy_(source)
            if self.buf.accelerator is not None:
                source = self.buf.accelerator.to_device(source)
        return source


class _TargetMerge:
    """One output's part of a tensor position: its deltas, DoRA magnitude, encoder, and the shard it goes to."""

    def __init__(self, target: _Target, sink: ShardSink, merger: _TensorMerger):
        tensor = target.tensor
        self.t, self.lane, self.sink, self.m = tensor, target.output, sink, merger
        device = merger.buf.device
        self.deltas = [_LoadedDelta.load(d, device, tensor.dtype) for d in tensor.deltas]
        self.magnitude = tensor.magnitude.read().to(device, torch.float32) if tensor.magnitude is not None else None
        self.token_rows = [(values.read().to(device, torch.float32), indices) for values, indices in tensor.token_rows]
        # DoRA on a weight stored [in, out] scales columns, by norms over every block (set before the merge)
        self.needs_column_norms = self.magnitude is not None and self.deltas[0].transposed
        self.column_factors: torch.Tensor | None = None
        self.encoder = tensor.encoding.encoder(tensor.shape) if tensor.encoding is not None else None
        # a k-quant GGUF encoder hands its slow part to the quantizer threads (see GGUFEncoder.encode_later)
        self.encode_later = getattr(self.encoder, "encode_later", None) if merger.buf.staging is None else None

    def write_block(self, rows: torch.Tensor, start: int, stop: int) -> int:
        """Merge this output's deltas into the block's `rows`, encode, hand to the writer; the bytes written."""
        out = self.m.out
        host = torch.frombuffer(out.next_buffer(), dtype=torch.uint8)
        staging = self.m.buf.staging
        target = host if staging is None else staging  # where the block is encoded
        if not self.t.needs_fp32:
            dense = _typed(target, self.t.dtype, rows.shape).copy_(rows)
            nbytes = dense.numel() * dense.element_size()
        else:
            work = self._merged(rows, start, stop)
            if self.column_factors is not None:
                work.mul_(self.column_factors)
            elif self.magnitude is not None:  # DoRA on [out, in]: one norm per row, as PEFT computes it
                work.mul_((self.magnitude[start:stop] / torch.linalg.norm(work, dim=1)).view(-1, 1))
            # a block's sum is finite unless it holds NaN/Inf (or overflows, which the exact test rules out)
            if not (self.m.allow_nonfinite or math.isfinite(work.sum().item()) or torch.isfinite(work).all()):
                raise InputError(f"{self.t.source.path}: merged tensor {self.t.name!r} has NaN or Inf values "
                                 f"(rows {start}-{stop}); the adapter or base is broken. Pass "
                                 "--allow-nonfinite to keep them")
            deferred = self.encode_later(work, target) if self.encode_later is not None else None
            if deferred is not None:
                nbytes, encode = deferred
                out.write(self.lane, self.sink, nbytes, encode)
                return nbytes
            if self.encoder is not None:
                nbytes = self.encoder.encode(work, target)
            else:
                dense = _typed(target, self.t.dtype, rows.shape).copy_(work)
                nbytes = dense.numel() * dense.element_size()
        if self.m.buf.accelerator is not None:
            self.m.buf.accelerator.to_host(target[:nbytes], host[:nbytes])
        out.write(self.lane, self.sink, nbytes)
        return nbytes

    def statistics(self) -> list[bytes]:
        return self.encoder.statistics() if self.encoder is not None else []

    def _merged(self, rows: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of the source plus every delta of this output, in float32."""
        work = self.m.buf.work[: rows.numel()].view(rows.shape).copy_(rows)
        for delta in self.deltas:
            delta.add_rows(work, self.m.buf.delta, start, stop)
        for ref, scale in self.t.bias_deltas:
            work.add_(ref.read().to(work.device, torch.float32).reshape(work.shape) * scale)
        for values, indices in self.token_rows:  # PEFT's TrainableTokens: `index_copy` of the new rows
            for k, index in enumerate(indices):
                if start <= index < stop:
                    work[index - start] = values[k]
        return work

    def column_norms(self) -> torch.Tensor:
        """DoRA norms of a transposed weight ([in, out]): one per column, so over every row block.

        A tensor that fits one block gets PEFT's exact `linalg.norm`; larger ones accumulate squares in
        float64 over a first pass (within float32 rounding of PEFT's value).
        """
        blocks = self.m._blocks()
        if len(blocks) == 1:
            return torch.linalg.norm(self._merged(self.m.read(0, self.t.rows), 0, self.t.rows).T, dim=1)
        squares = torch.zeros(self.m.cols, dtype=torch.float64, device=self.m.buf.device)
        for start, stop in blocks:
            squares += self._merged(self.m.read(start, stop), start, stop).double().square().sum(dim=0)
        return squares.sqrt().float()


class ShardSink(Protocol):
    """Where a shard's bytes go: a `ShardWriter`, or the comparator `verify` uses."""

    def write(self, chunk: memoryview | bytes) -> None: ...

    def copy_from(self, fd: int, offset: int, count: int) -> bool: ...

    def commit(self) -> None: ...

    def abort(self) -> None: ...


@dataclass
class _ShardStep:
    """One shard position of the pass: the outputs still to write it, and per tensor position the copies
    and the merges (one per distinct source) that produce it."""

    index: int
    outputs: list[int]
    positions: list[tuple[list[_Target], list[_TensorMerger]]]


def _steps(plans: Sequence[Plan], finished: Sequence[set[str]], allow_nonfinite: bool) -> list[_ShardStep]:
    block_elements = plans[0].memory.block_elements
    steps = []
    for index, shard in enumerate(plans[0].shards):
        outputs = [k for k, plan in enumerate(plans) if plan.shards[index].filename not in finished[k]]
        positions = []
        for position in range(len(shard.tensors)):
            targets = [_Target(k, plans[k].shards[index].tensors[position]) for k in outputs]
            by_source: dict[int, list[_Target]] = {}
            for target in targets:
                if not target.tensor.is_copy:
                    by_source.setdefault(id(target.tensor.source), []).append(target)
            positions.append(([t for t in targets if t.tensor.is_copy],
                              [_TensorMerger(group, block_elements, allow_nonfinite) for group in by_source.values()]))
        steps.append(_ShardStep(index, outputs, positions))
    return steps


def merge_threads() -> int:
    """torch's intra-op threads for the merge: the cores left beside the reader and writer threads, at least one.

    More threads than free cores make OpenMP's threads wait for one another at every operation: measured on 2
    shared cores (load average 10-12), one 1M-element block op took 15-80 ms with 2 threads, 1-6 ms with one.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(torch.get_num_threads(), cores - BACKGROUND_THREADS))


def write_outputs(plans: Sequence[Plan], open_sink: Callable[[int, Shard], ShardSink], progress: Progress, *,
                  finished: Sequence[set[str]] | None = None,
                  on_committed: Callable[[int, str, int, int], None] = lambda _k, _name, _size, _crc: None,
                  allow_nonfinite: bool = False, accelerator: Accelerator | None = None) -> None:
    """Produce every shard of every plan (all over the same base, with the same layout) in one pass over the
    base; output k's shards not in `finished[k]` go to the sink `open_sink(k, shard)` gives. Blocks are merged
    and encoded on the `accelerator` when there is one, else on the CPU.

    Each shard is committed (for a file: fsynced, renamed) on the writer thread once its last block is
    written, then `on_committed(k, filename, size, crc32)` runs there too (for sinks that are files), while
    the next shard is already being computed.
    """
    assert all(layout(p.shards) == layout(plans[0].shards) for p in plans), "outputs of one pass share a layout"
    finished = finished or [set() for _ in plans]
    keep_heap_bounded()
    elements = plans[0].memory.block_elements
    decoded = [t for plan in plans for t in plan.tensors if not t.is_copy] or [t for p in plans for t in p.tensors]
    stored = max(t.source.buffer_bytes_per_element for t in decoded)
    steps = _steps(plans, finished, allow_nonfinite)
    out_bytes = elements * max(max(t.dtype.itemsize for t in decoded), 1)
    work = _Work(elements if any(t.needs_fp32 for t in decoded) else 0, out_bytes, accelerator)
    threads, merging = torch.get_num_threads(), merge_threads()
    torch.set_num_threads(merging)
    reader = _ReadAhead((read for step in steps for _, merges in step.positions for m in merges for read in m.reads()),
                        elements * stored + BUFFER_SLACK, work.device, merging)
    out = _WriteBehind(out_bytes, len(plans) + 1, len(plans))
    try:
        for step in steps:
            for k, plan in enumerate(plans):
                if k not in step.outputs:
                    progress(plan.shards[step.index].nbytes)
            sinks: dict[int, ShardSink] = {}
            try:
                for k in step.outputs:
                    sinks[k] = open_sink(k, plans[k].shards[step.index])
                for copies, merges in step.positions:
                    for target in copies:
                        source = target.tensor.source
                        assert isinstance(source, TensorRef)
                        if source.numel:
                            out.copy(target.output, sinks[target.output], source)
                            progress(source.nbytes)
                    for merge in merges:
                        merge.run(reader, work, out, sinks, progress)
                for k, sink in sinks.items():
                    out.commit(k, sink, lambda k=k, name=plans[k].shards[step.index].filename, sink=sink: on_committed(
                        k, name, getattr(sink, "size", 0), getattr(sink, "crc32", 0)))
            except BaseException:
                out.close()  # no write may touch a file once it is aborted
                for sink in sinks.values():
                    sink.abort()
                raise
        out.drain()
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            free = shutil.disk_usage(plans[0].out_dir.parent).free
            needed = sum(plan.disk_needed for plan in plans)
            raise ResourceError(f"{plans[0].out_dir}: the disk filled while writing the output ({exc.strerror}); it "
                                f"needs {format_size(needed)} in all, {format_size(free)} is free now") from exc
        raise
    finally:
        out.close()
        reader.close()
        torch.set_num_threads(threads)


def write_shards(plan: Plan, open_sink: Callable[[Shard], ShardSink], progress: Progress, *,
                 finished: set[str] = frozenset(),
                 on_committed: Callable[[str, int, int], None] = lambda _name, _size, _crc: None,
                 allow_nonfinite: bool = False, accelerator: Accelerator | None = None) -> None:
    """`write_outputs` for one plan: every shard not in `finished`, from the sink `open_sink` gives for it."""
    write_outputs([plan], lambda _k, shard: open_sink(shard), progress, finished=[set(finished)],
                  on_committed=lambda _k, name, size, crc: on_committed(name, size, crc),
                  allow_nonfinite=allow_nonfinite, accelerator=accelerator)
