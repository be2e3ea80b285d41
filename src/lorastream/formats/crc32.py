"""CRC-32 (zip's, zlib's) of large buffers on several threads, and of a file from its parts' CRCs.

A zip entry's CRC is needed for every byte written, and `zlib.crc32` runs at about 1 GB/s on one core. It
releases the GIL on large buffers, so pieces of a buffer are checksummed on a small thread pool while the
caller writes the buffer; `crc32_combine` (zlib's, which Python's zlib lacks) joins the pieces' CRCs, and
joins entry CRCs into the whole file's without a second pass over the bytes.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import cache

PIECE = 512 << 10  # pieces of this size are checksummed concurrently; smaller buffers on the caller's thread
_POLYNOMIAL = 0xEDB88320  # reflected CRC-32 polynomial


def _times(matrix: list[int], vector: int) -> int:
    """A GF(2) 32x32 matrix (list of columns) times a 32-bit vector."""
    result, column = 0, 0
    while vector:
        if vector & 1:
            result ^= matrix[column]
        vector >>= 1
        column += 1
    return result


def _square(matrix: list[int]) -> list[int]:
    return [_times(matrix, column) for column in matrix]


@cache
def _zero_operators() -> tuple[list[int], ...]:
    """The operator appending 2**k zero bytes to a CRC register, for k = 0..63."""
    one_bit = [_POLYNOMIAL] + [1 << n for n in range(31)]
    operator = _square(_square(_square(one_bit)))  # 8 zero bits
    operators = [operator]
    for _ in range(63):
        operators.append(_square(operators[-1]))
    return tuple(operators)


def crc32_combine(crc1: int, crc2: int, length2: int) -> int:
    """The CRC-32 of A + B from crc32(A), crc32(B) and len(B), as zlib's `crc32_combine`."""
    for k, operator in enumerate(_zero_operators()):
        if length2 >> k & 1:
            crc1 = _times(operator, crc1)
    return crc1 ^ crc2


class Checksummer:
    """Starts CRC-32s of buffers on a thread pool; `close` when done."""

    def __init__(self, threads: int = min(4, os.cpu_count() or 1)):
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="lorastream-crc")

    def start(self, view: memoryview) -> Callable[[int], int]:
        """Begin checksumming `view` (which must not change until the result is taken); the returned function
        continues a running CRC with it, waiting for the pieces."""
        if len(view) < 2 * PIECE:
            return lambda crc: zlib.crc32(view, crc)
        pieces = [view[start:start + PIECE] for start in range(0, len(view), PIECE)]
        futures = [self._pool.submit(zlib.crc32, piece) for piece in pieces]

        def finish(crc: int) -> int:
            for piece, future in zip(pieces, futures, strict=True):
                crc = crc32_combine(crc, future.result(), len(piece))
            return crc

        return finish

    def close(self) -> None:
        self._pool.shutdown(wait=True)
