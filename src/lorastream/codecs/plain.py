"""A tensor located in a file but not loaded: where its bytes are and how to read a row range of them.

Every reader (safetensors, torch zip pickles) resolves a tensor to contiguous row-major bytes at a file
offset, so the engine reads any format the same way: `pread` into a reused buffer, no memory maps.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from ..device import CPU
from ..errors import InputError
from ..io.locations import Location, RemotePath

# Room for the 64-byte alignment of the regions a decode places in a read buffer (see `buffer_region`).
BUFFER_SLACK = 256


def buffer_region(buffer: memoryview | None, offset: int, count: int,
                  dtype: torch.dtype) -> tuple[torch.Tensor | None, int]:
    """`count` values of `dtype` viewing `buffer` from `offset` rounded up to 64 bytes, and the offset after them;
    None where there is no buffer or they do not fit. A decode puts its result and temporaries there, after the
    stored bytes, rather than in fresh memory: a fresh block-sized tensor is fresh pages (glibc's mmap threshold
    is lowered, see `memory.keep_heap_bounded`), whose page faults cost as much as the decode itself."""
    start = -(-offset // 64) * 64
    end = start + count * dtype.itemsize
    if buffer is None or end > len(buffer):
        return None, end
    if count == 0:
        return torch.empty(0, dtype=dtype), end
    return torch.frombuffer(buffer, dtype=torch.uint8, count=end - start, offset=start).view(dtype), end


@dataclass(frozen=True)
class TensorRef:
    """A contiguous tensor stored at `offset` in `path`, read in rows: every dimension but the last forms the rows
    (a fused-experts tensor [experts, out, in] is experts x out rows of `in` elements), so a row block can be
    smaller than one expert's matrix."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    path: Location
    offset: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def rows(self) -> int:
        """Number of rows; a scalar or 1-D tensor is read as one row."""
        return math.prod(self.shape[:-1]) if len(self.shape) > 1 else 1

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.rows if self.rows else 0

    @property
    def row_elements(self) -> int:
        return self.numel // self.rows if self.rows else 0

    # What the engine asks of every source (see codecs.Source): a plain tensor decodes to itself.
    row_alignment = 1

    @property
    def dense_dtype(self) -> torch.dtype:
        return self.dtype

    @property
    def decode_bytes_per_element(self) -> int:
        return self.dtype.itemsize

    @property
    def buffer_bytes_per_element(self) -> int:
        return self.dtype.itemsize

    @property
    def stored_bytes(self) -> int:
        return self.nbytes

    def read_elements_into(self, first: int, count: int, buffer: memoryview) -> torch.Tensor:
        """Read the flat elements [first, first + count) into `buffer`; a 1-D tensor viewing it."""
        itemsize = self.dtype.itemsize
        nbytes = count * itemsize
        view = buffer[:nbytes]
        if isinstance(self.path, RemotePath):
            if self.path.read_into(self.offset + first * itemsize, view) < nbytes:
                raise InputError(f"{self.path}: tensor {self.name!r} ends past the end of the file (truncated?)")
        else:
            self._pread(view, self.offset + first * itemsize)
        if count == 0:
            return torch.empty(0, dtype=self.dtype)
        return torch.frombuffer(view, dtype=self.dtype, count=count)

    def _pread(self, view: memoryview, offset: int) -> None:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            done = 0
            while done < len(view):
                got = os.preadv(fd, [view[done:]], offset + done)
                if got == 0:
                    raise InputError(f"{self.path}: tensor {self.name!r} ends past the end of the file (truncated?)")
                done += got
        finally:
            os.close(fd)

    def read_rows(self, start: int, stop: int, buffer: memoryview, device: torch.device = CPU) -> torch.Tensor:
        """Rows [start, stop) as a [rows, row_elements] tensor viewing `buffer` (or its copy on `device`)."""
        cols = self.row_elements
        rows = self.read_elements_into(start * cols, (stop - start) * cols, buffer).view(stop - start, cols)
        return rows.to(device)

    def read(self) -> torch.Tensor:
        """Read the whole tensor into fresh memory (for small tensors: adapters, statistics)."""
        return self.read_elements_into(0, self.numel, memoryview(bytearray(self.nbytes))).view(self.shape)
