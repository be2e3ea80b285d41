"""A tensor located in a file but not loaded: where its bytes are and how to read a row range of them.

Every reader (safetensors, torch zip pickles) resolves a tensor to contiguous row-major bytes at a file
offset, so the engine reads any format the same way: `pread` into a reused buffer, no memory maps.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputError


@dataclass(frozen=True)
class TensorRef:
    """A contiguous tensor stored at `offset` in `path`; rows are slices along dimension 0."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    path: Path
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
        return self.shape[0] if len(self.shape) > 1 else 1

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.rows if self.rows else 0

    def read_rows_into(self, start: int, stop: int, buffer: memoryview) -> torch.Tensor:
        """Read rows [start, stop) into `buffer` (bytes) and return them as a tensor viewing it."""
        count = (stop - start) * self.row_bytes
        view = buffer[:count]
        fd = os.open(self.path, os.O_RDONLY)
        try:
            done = 0
            while done < count:
                got = os.preadv(fd, [view[done:]], self.offset + start * self.row_bytes + done)
                if got == 0:
                    raise InputError(f"{self.path}: tensor {self.name!r} ends past the end of the file (truncated?)")
                done += got
        finally:
            os.close(fd)
        shape = (stop - start, *self.shape[1:]) if len(self.shape) > 1 else self.shape
        if count == 0:
            return torch.empty(shape, dtype=self.dtype)
        return torch.frombuffer(view, dtype=self.dtype, count=count // self.dtype.itemsize).view(shape)

    def read(self) -> torch.Tensor:
        """Read the whole tensor into fresh memory (for small adapter tensors only)."""
        return self.read_rows_into(0, self.rows, memoryview(bytearray(self.nbytes))).clone()
