"""Tensors assembled from row ranges of stored tensors: the q, k and v of a fused weight, re-interleaved heads.

A row range of a stored tensor is itself stored contiguously (a shifted offset, a smaller shape), so
splitting or reordering rows of a checkpoint costs no copy until the engine reads a block.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..codecs.plain import TensorRef, buffer_region
from ..device import CPU
from ..errors import InputError

if TYPE_CHECKING:
    from ..codecs import Source


def slice_rows(ref: TensorRef, start: int, stop: int) -> TensorRef:
    """Indices [start, stop) of dimension 0 of a stored tensor (elements of a 1-D one), still in its file."""
    if not ref.shape or not 0 <= start <= stop <= ref.shape[0]:
        raise InputError(f"{ref.path}: rows [{start}, {stop}) are outside tensor {ref.name!r} of shape "
                         f"{list(ref.shape)}")
    step = ref.nbytes // ref.shape[0] if ref.shape[0] else 0
    return dataclasses.replace(ref, shape=(stop - start, *ref.shape[1:]), offset=ref.offset + start * step)


@dataclass(frozen=True)
class StoredRows:
    """The concatenation along dimension 0 of stored pieces of one dtype, rounded to `dtype` when read.

    Rounding on read is how LitGPT merges: it casts the whole model to the LoRA weights' dtype first, then
    adds the update in that dtype. A source in the engine's sense (see `codecs.Source`).
    """

    name: str
    pieces: tuple[TensorRef, ...]
    dtype: torch.dtype

    def __post_init__(self) -> None:
        first = self.pieces[0]
        for piece in self.pieces[1:]:
            if piece.dtype != first.dtype or piece.shape[1:] != first.shape[1:]:
                raise InputError(f"{piece.path}: {piece.name!r} {piece.dtype} {list(piece.shape)} cannot be "
                                 f"joined with {first.name!r} {first.dtype} {list(first.shape)}")

    @property
    def path(self) -> Path:
        return self.pieces[0].path

    @property
    def stored_dtype(self) -> torch.dtype:
        return self.pieces[0].dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return (sum(p.shape[0] for p in self.pieces), *self.pieces[0].shape[1:])

    @property
    def numel(self) -> int:
        return sum(p.numel for p in self.pieces)

    @property
    def rows(self) -> int:
        return self.shape[0] if len(self.shape) > 1 else 1

    @property
    def row_elements(self) -> int:
        return self.numel // self.rows if self.rows else 0

    @property
    def dense_dtype(self) -> torch.dtype:
        return self.dtype

    @property
    def stored_bytes(self) -> int:
        return sum(p.nbytes for p in self.pieces)

    row_alignment = 1

    @property
    def decode_bytes_per_element(self) -> int:
        """The stored bytes, plus the rounded copy when the dtypes differ."""
        return self.buffer_bytes_per_element

    @property
    def buffer_bytes_per_element(self) -> int:
        return self.stored_dtype.itemsize + (self.dtype.itemsize if self.dtype != self.stored_dtype else 0)

    def read_rows(self, start: int, stop: int, buffer: memoryview, device: torch.device = CPU) -> torch.Tensor:
        cols = self.row_elements
        first, end = start * cols, stop * cols
        itemsize = self.stored_dtype.itemsize
        piece_start = 0
        for piece in self.pieces:
            low, high = max(first, piece_start), min(end, piece_start + piece.numel)
            if low < high:
                piece.read_elements_into(low - piece_start, high - low, buffer[(low - first) * itemsize:])
            piece_start += piece.numel
        rows = torch.frombuffer(buffer, dtype=self.stored_dtype, count=end - first).view(stop - start, cols)
        rounded, _ = buffer_region(buffer if device == CPU else None, rows.numel() * itemsize, rows.numel(), self.dtype)
        return rows.to(device, self.dtype) if rounded is None or rows.dtype == self.dtype else (
            rounded.view(rows.shape).copy_(rows))


@dataclass(frozen=True)
class SourceRows:
    """Row ranges of other sources joined along dimension 0, read through those sources: what `StoredRows` is for
    stored bytes, for sources that compute their rows (a LitGPT weight as QLoRA training saw it, its fused qkv
    split into Hugging Face's q, k and v). Each part is (source, first row, end row)."""

    name: str
    parts: tuple[tuple[Source, int, int], ...]

    def __post_init__(self) -> None:
        first, at = self.parts[0][0], 0
        for source, start, stop in self.parts:
            if source.dtype != first.dtype or source.shape[1:] != first.shape[1:]:
                raise InputError(f"{source.path}: {source.name!r} {source.dtype} {list(source.shape)} cannot be "
                                 f"joined with {first.name!r} {first.dtype} {list(first.shape)}")
            if start % source.row_alignment or at % source.row_alignment:
                raise InputError(f"{source.path}: rows {start}-{stop} of {source.name!r} do not start on its "
                                 f"{source.row_alignment}-row blocks; its quantization blocks straddle the split")
            at += stop - start

    @property
    def path(self) -> Path:
        return self.parts[0][0].path

    @property
    def dtype(self) -> torch.dtype:
        return self.parts[0][0].dtype

    @property
    def dense_dtype(self) -> torch.dtype:
        return self.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return (sum(stop - start for _, start, stop in self.parts), *self.parts[0][0].shape[1:])

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def row_elements(self) -> int:
        return self.parts[0][0].row_elements

    @property
    def numel(self) -> int:
        return self.rows * self.row_elements

    @property
    def stored_bytes(self) -> int:
        return sum(source.stored_bytes * (stop - start) // max(1, source.rows) for source, start, stop in self.parts)

    @property
    def row_alignment(self) -> int:
        return math.lcm(*(source.row_alignment for source, _, _ in self.parts))

    @property
    def decode_bytes_per_element(self) -> int:
        """The largest part's decoding, plus the joined copy the block is assembled in."""
        return max(source.decode_bytes_per_element for source, _, _ in self.parts) + self.dtype.itemsize

    @property
    def buffer_bytes_per_element(self) -> int:
        """Each part's block read in turn at the buffer's start, the joined block after the largest."""
        return max(source.buffer_bytes_per_element for source, _, _ in self.parts) + self.dtype.itemsize

    @property
    def resident_bytes(self) -> int:
        return sum(getattr(source, "resident_bytes", 0) for source in {id(s): s for s, _, _ in self.parts}.values())

    @property
    def uses_kernels(self) -> bool:
        return any(getattr(source, "uses_kernels", False) for source, _, _ in self.parts)

    def read_rows(self, start: int, stop: int, buffer: memoryview, device: torch.device = CPU) -> torch.Tensor:
        """Each overlapping part read through its source (which may use `buffer`), copied into the block."""
        count = (stop - start) * self.row_elements
        block, _ = buffer_region(buffer if device == CPU else None,
                                 count * (self.buffer_bytes_per_element - self.dtype.itemsize), count, self.dtype)
        block = (torch.empty(count, dtype=self.dtype, device=device) if block is None else block).view(
            stop - start, *self.shape[1:])
        at = 0
        for source, first, end in self.parts:
            low, high = max(start, at), min(stop, at + end - first)
            if low < high:
                block[low - start:high - start].copy_(source.read_rows(first + low - at, first + high - at, buffer,
                                                                       device))
            at += end - first
        return block
