"""GGUF tensor types as an output encoding: each merged row block rounded as the reference saw it, rows
permuted where llama.cpp wants them (Llama's q/k), and stored in its GGUF type.

The reference route saves the merged model in its own dtype, then converts: so every value is first rounded
to `stored` (the merged folder's dtype), then encoded. Dense types are torch casts (round to nearest even, as
gguf-py's numpy casts); the legacy block types (q8_0, q4_0, q4_1, q5_0, q5_1) are gguf-py's own numpy
quantizers (what `convert_hf_to_gguf.py --outtype q8_0` runs; for Q8_0 lorastream's compiled kernel computes
the same bytes, several times faster, when the compiled path runs); the k-quants are ggml's own
`ggml_quantize_chunk`, called through ctypes (what `llama-quantize` runs), never a port; where ggml's library is
there it quantizes the legacy types too, to the same bytes, faster. Quantization blocks
run along a row, so any block of whole rows quantizes as the whole tensor would.
"""

from __future__ import annotations

import ctypes
import importlib.util
import itertools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from ..cache import cache_root
from ..dtypes import GGUF_TORCH_DTYPES
from ..errors import InputError
from . import kernels

GGUF_EXTRA = "pip install 'lorastream[gguf]'"
LIBRARY_ENV = "LORASTREAM_GGML_LIB"
# ggml's k-quant types: quantized by ggml itself; gguf-py only dequantizes them.
K_QUANTS = frozenset({"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"})
# ggml's quantizer takes a block in this many parts per core: queued behind the last block's, they keep every
# core busy while that block's slowest part finishes.
_PARTS_PER_THREAD = 4


def gguf_module():  # type: ignore[no-untyped-def]
    """llama.cpp's gguf-py (`gguf`), or the one-line error that says how to install it."""
    try:
        import gguf
    except ImportError:
        raise InputError(f"--format gguf needs llama.cpp's gguf package: {GGUF_EXTRA}") from None
    return gguf


def ggml_type(name: str) -> int:
    return int(gguf_module().GGMLQuantizationType[name])


def block_geometry(name: str) -> tuple[int, int]:
    """(elements per block, bytes per block) of a GGUF type."""
    gguf = gguf_module()
    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]]  # type: ignore[no-any-return]


def row_bytes(name: str, row_elements: int) -> int:
    """Bytes a row of `row_elements` values takes in type `name` (a whole number of blocks)."""
    elements, nbytes = block_geometry(name)
    return row_elements // elements * nbytes


def fits_blocks(name: str, row_elements: int) -> bool:
    return row_elements % block_geometry(name)[0] == 0


def _library_candidates() -> list[Path]:
    """Where ggml's shared library may be: LORASTREAM_GGML_LIB, an installed llama-cpp-python, the cache build."""
    found = [Path(os.environ[LIBRARY_ENV])] if os.environ.get(LIBRARY_ENV) else []
    spec = importlib.util.find_spec("llama_cpp")
    if spec is not None and spec.origin is not None:
        found.append(Path(spec.origin).parent / "lib" / "libggml-base.so")
    found.append(cache_root() / "llama.cpp" / "build" / "bin" / "libggml-base.so")  # `make llama-cpp` builds it
    return found


@cache
def ggml_library() -> ctypes.CDLL:
    """ggml's base library, with `ggml_quantize_chunk` typed; a clear error when none is found."""
    for path in _library_candidates():
        if path.is_file():
            library = ctypes.CDLL(str(path))
            library.ggml_quantize_chunk.restype = ctypes.c_size_t
            library.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                                    ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
            return library
    raise InputError("--quantize with k-quants (q4_k_m, q5_k_m, q6_k) needs ggml's library: pip install "
                     "'lorastream[gguf-k]' (llama-cpp-python), or set LORASTREAM_GGML_LIB to libggml-base.so")


@cache
def ggml_available() -> bool:
    """Whether ggml's library is there: it then quantizes the legacy block types too (the same bytes as gguf-py's
    numpy quantizers, on every core)."""
    try:
        ggml_library()
    except InputError:
        return False
    return True


@dataclass(frozen=True)
class GGUFEncoding:
    """One GGUF tensor type for one tensor: `qtype` (ggml's name), `stored` the dtype the merged values are
    rounded to first, `head_rows` the rows of one attention head when llama.cpp's rotary row order is wanted
    (Llama q/k: each head's two halves interleaved), else 0; `shift` is added to every value once rounded."""

    qtype: str
    stored: torch.dtype
    head_rows: int = 0
    shift: float = 0.0  # added after rounding (Gemma's norms: llama.cpp stores 1 + w)

    @property
    def uses_kernels(self) -> bool:
        """Q8_0 is lorastream's compiled kernel; the others gguf-py's numpy quantizers or ggml's library."""
        return self.qtype == "Q8_0"

    def row_alignment(self, row_elements: int) -> int:
        return max(1, self.head_rows)

    @property
    def encode_bytes_per_element(self) -> int:
        """Temporaries of one block: the permuted copy, the rounded copy, numpy's quantizer intermediates."""
        if self.qtype in GGUF_TORCH_DTYPES:
            return 8
        return 8 + (4 if self.qtype in K_QUANTS else 24)

    def state_bytes(self, numel: int) -> int:
        return 0

    def specs(self, name: str, shape: tuple[int, ...]) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        if self.qtype in GGUF_TORCH_DTYPES:
            return [(name, GGUF_TORCH_DTYPES[self.qtype], shape)]
        rows = math.prod(shape[:-1])
        return [(name, torch.uint8, (rows, row_bytes(self.qtype, shape[-1])))]

    def encoder(self, shape: tuple[int, ...]) -> GGUFEncoder:
        return GGUFEncoder(self)


class GGUFEncoder:
    """Encodes blocks of whole rows into the output buffer, in the tensor's GGUF type."""

    def __init__(self, encoding: GGUFEncoding):
        self.encoding = encoding
        self._buffers: dict[tuple[torch.dtype, int], torch.Tensor] = {}

    def _permuted(self, values: torch.Tensor) -> torch.Tensor:
        """The block's rows in llama.cpp's order within each head (a view; no copy)."""
        head_rows = self.encoding.head_rows
        if not head_rows:
            return values
        rows, cols = values.shape
        return values.view(rows // head_rows, 2, head_rows // 2, cols).transpose(1, 2)

    def _buffer(self, dtype: torch.dtype, like: torch.Tensor, owner: int = 0) -> torch.Tensor:
        """A `like`-shaped tensor of `dtype`, reused from block to block (one per `owner`): a fresh block-sized
        tensor is an mmap whose page faults cost as much as the arithmetic done in it."""
        buffer = self._buffers.get((dtype, owner))
        if buffer is None or buffer.numel() < like.numel() or buffer.device != like.device:
            buffer = self._buffers[dtype, owner] = torch.empty(like.numel(), dtype=dtype, device=like.device)
        return buffer[: like.numel()].view(like.shape)

    def _arranged(self, values: torch.Tensor, owner: int = 0) -> torch.Tensor:
        """The block rounded to the stored dtype and back (plus the shift), rows in llama.cpp's order."""
        rounded = values
        if self.encoding.stored != torch.float32:
            rounded = self._buffer(self.encoding.stored, values).copy_(values)
        arranged = self._buffer(torch.float32, values, owner)
        source = self._permuted(rounded)
        arranged.view(source.shape).copy_(source)  # back to float32 and into llama.cpp's row order, in one pass
        if self.encoding.shift:
            arranged += self.encoding.shift
        return arranged.cpu()

    def encode(self, values: torch.Tensor, out: torch.Tensor) -> int:
        qtype = self.encoding.qtype
        if qtype in GGUF_TORCH_DTYPES:
            dtype = GGUF_TORCH_DTYPES[qtype]
            nbytes = values.numel() * dtype.itemsize
            target = out[:nbytes].view(dtype).view(values.shape)
            if dtype == self.encoding.stored and not self.encoding.shift:  # one rounding, in one pass
                source = self._permuted(values)
                target.view(source.shape).copy_(source)
            else:
                target.copy_(self._arranged(values))
            return nbytes
        block = self._arranged(values)
        if qtype == "Q8_0" and (nbytes := kernels.quantize_q8_0(block, out)) is not None:
            return nbytes
        if qtype in K_QUANTS or ggml_available():
            return self._ggml(block, out)()
        gguf = gguf_module()
        encoded = gguf.quants.quantize(block.numpy(), gguf.GGMLQuantizationType[qtype])
        nbytes = encoded.nbytes
        out[:nbytes].copy_(torch.from_numpy(encoded.reshape(-1)))
        return nbytes

    def encode_later(self, values: torch.Tensor, out: torch.Tensor) -> tuple[int, Callable[[], object]] | None:
        """A k-quant block, rounded and arranged now (into a buffer that belongs to `out`, so it lives until `out` is
        written) and handed to ggml's quantizer, the slow part of a k-quant merge, on the quantizer threads; returns
        the bytes it will write and the wait for them (the engine waits on the writer's thread, so the next
        blocks are merged, and queued for ggml, meanwhile). None for the other types, which `encode` handles at
        once."""
        if self.encoding.qtype not in K_QUANTS:
            return None
        block = self._arranged(values, out.data_ptr())
        return block.shape[0] * row_bytes(self.encoding.qtype, block.shape[1]), self._ggml(block, out)

    def _ggml(self, block: torch.Tensor, out: torch.Tensor) -> Callable[[], int]:
        """ggml's own quantizer (no importance matrix), straight into the output buffer, its rows in a few parts
        per core (ctypes releases the GIL; rows are independent), queued behind the earlier blocks' parts so no
        core waits for a block's last part; the wait for them."""
        rows, cols = block.shape
        size = row_bytes(self.encoding.qtype, cols)
        assert out.numel() >= rows * size and out.is_contiguous()
        library, qtype = ggml_library(), ggml_type(self.encoding.qtype)
        parts = min(rows, _PARTS_PER_THREAD * kernels.quantizer_threads())
        bounds = [rows * i // parts for i in range(parts + 1)]

        def quantize(low: int, high: int) -> int:
            return int(library.ggml_quantize_chunk(qtype, block[low:high].data_ptr(), out.data_ptr() + low * size, 0,
                                                   high - low, cols, None))

        pool = kernels.quantizer_pool()
        futures = [pool.submit(quantize, low, high) for low, high in itertools.pairwise(bounds)]

        def wait() -> int:
            written = sum(future.result() for future in futures)
            assert written == rows * size, f"ggml wrote {written} bytes, expected {rows * size}"
            return written

        return wait

    def statistics(self) -> list[bytes | bytearray]:
        return []
