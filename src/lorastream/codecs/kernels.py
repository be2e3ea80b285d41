"""The codec kernels: bitsandbytes 4-bit decode and quantize, LLM.int8 quantize.

Two paths compute the same bits: compiled loops (`numba_kernels`, one pass over the data, near memory speed on
one core) and torch formulations (several passes with temporaries; the reference for the compiled loops, and
what runs on an accelerator). The compiled path is chosen when numba can be imported, unless the environment
variable LORASTREAM_KERNELS is `torch`; `numba` insists on it. The choice is logged once per process.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from types import ModuleType

import torch

logger = logging.getLogger("lorastream")
ENV = "LORASTREAM_KERNELS"
_MODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# What loading the compiled path adds to a process's RSS, rounded up: numba and LLVM (84 MiB) and the kernels'
# machine code (45 MiB), measured with numba 0.68 on x86-64.
LOAD_BYTES = 144 << 20


def load_bytes() -> int:
    """Memory the compiled kernels will add when first used: none once loaded (it is in the process's RSS then),
    on the torch path, or without numba."""
    if f"{__package__}.numba_kernels" in sys.modules:
        return 0
    if os.environ.get(ENV, "auto").lower() == "torch" or importlib.util.find_spec("numba") is None:
        return 0
    return LOAD_BYTES


@cache
def compiled() -> ModuleType | None:
    """The compiled kernels, or None when the torch path is to run (logged the first time it is asked)."""
    choice = os.environ.get(ENV, "auto").lower()
    if choice not in ("auto", "numba", "torch"):
        raise ValueError(f"{ENV}={choice!r}: expected auto, numba or torch")
    module = None
    if choice != "torch":
        try:
            from . import numba_kernels as module
        except ImportError as exc:
            if choice == "numba":
                raise
            logger.info("codec kernels: torch (numba is not installed: %s)", exc)
            return None
    if module is None:
        logger.info("codec kernels: torch (%s=torch)", ENV)
        return None
    logger.info("codec kernels: compiled (numba %s)", module.numba.__version__)
    return module


def _host(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "cpu"


def decode_4bit(packed: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor, blocksize: int, count: int,
                dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """`count` values from packed nibbles (high nibble first): `(code[nibble] * absmax[i // blocksize]).to(dtype)`
    in float32; into `out` (`count` values of `dtype` on the host) when given."""
    kernels = compiled()
    if kernels is None or not _host(packed):
        values = _code_pairs(code.to(packed.device))[packed.long()].view(-1)[:count]  # both nibbles at once
        decoded = scale_blocks(values, absmax, blocksize).to(dtype)
        return decoded if out is None else out.copy_(decoded)
    if out is None:
        out = torch.empty(count, dtype=dtype)
    bits = out if dtype == torch.float32 else out.view(torch.int16)
    kernels.decode_4bit(packed.numpy(), code.numpy(), absmax.numpy(), blocksize, count, bits.numpy(),
                        _MODES[dtype])
    return out


def _code_pairs(code: torch.Tensor) -> torch.Tensor:
    """code[high nibble], code[low nibble] of every byte value: a [256, 2] table."""
    byte = torch.arange(256, device=code.device)
    return torch.stack((code[byte >> 4], code[byte & 0xF]), dim=1)


def scale_blocks(values: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """values[i] * absmax[i // blocksize] (float32), broadcasting over whole blocks."""
    full = values.numel() - values.numel() % blocksize
    out = torch.empty_like(values)
    torch.mul(values[:full].view(-1, blocksize), absmax[: full // blocksize].view(-1, 1),
              out=out[:full].view(-1, blocksize))
    if full < values.numel():
        torch.mul(values[full:], absmax[-1], out=out[full:])
    return out


def quantize_4bit(values: torch.Tensor, bounds: torch.Tensor, codes: torch.Tensor, blocksize: int,
                  out: torch.Tensor) -> tuple[int, torch.Tensor]:
    """bitsandbytes' 4-bit quantization of float32 `values` (starting a block) packed into uint8 `out`:
    (bytes written, float32 absmax per block). `bounds` are the midpoints of the sorted code, `codes` maps a
    bucket to its code (the argsort of the code table); an odd count is padded with the code of 0.0."""
    flat = values.reshape(-1)
    count, blocks = flat.numel(), -(-flat.numel() // blocksize)
    nbytes = (count + 1) // 2
    kernels = compiled()
    if kernels is None or not _host(flat):
        buckets, absmax = _quantize_4bit_torch(flat, bounds, blocksize)
        if count % 2:  # bitsandbytes pads with a scaled 0.0
            buckets = torch.cat([buckets, torch.bucketize(buckets.new_zeros(1, dtype=torch.float32),
                                                          bounds.to(flat.device), out_int32=True)])
        quantized = codes.to(flat.device)[buckets].to(torch.uint8)
        torch.bitwise_or(quantized[::2] << 4, quantized[1::2], out=out[:nbytes])
        return nbytes, absmax
    absmax = torch.empty(blocks, dtype=torch.float32)
    values_np, bounds_np, pairs_np = flat.contiguous().numpy(), bounds.numpy(), _pair_codes(codes).numpy()
    out_np, absmax_np = out[:nbytes].numpy(), absmax.numpy()

    def quantize(first: int, last: int) -> None:  # blocks [first, last): whole bytes, as blocksize is even
        low, high = first * blocksize, min(count, last * blocksize)
        kernels.quantize_4bit(values_np[low:high], bounds_np, pairs_np, blocksize, out_np[low // 2:(high + 1) // 2],
                              absmax_np[first:last])

    _split(quantize, blocks)
    return nbytes, absmax


def quantize_q8_0(values: torch.Tensor, out: torch.Tensor) -> int | None:
    """ggml's Q8_0 of float32 `values` (rows of whole 32-value blocks) into uint8 `out`: the bytes written, or
    None on the torch path (gguf-py's numpy quantizer or ggml's then run, to the same bytes)."""
    kernels = compiled()
    if kernels is None or not _host(values):
        return None
    flat = values.reshape(-1).contiguous().numpy()
    blocks = flat.shape[0] // 32
    packed = out[:blocks * 34].numpy()

    def quantize(first: int, last: int) -> None:
        kernels.quantize_q8_0(flat[first * 32:last * 32], packed[first * 34:last * 34])

    _split(quantize, blocks)
    return blocks * 34


# Below this many blocks per thread, splitting costs more than it saves.
_PARALLEL_BLOCKS = 1024


def _split(quantize: Callable[[int, int], None], blocks: int) -> None:
    """Run `quantize(first, last)` over blocks [0, blocks), split over the merge's threads: a quantizer is the
    main thread's largest cost on a quantizing merge (the compiled loops release the GIL; blocks are
    independent)."""
    parts = max(1, min(torch.get_num_threads(), blocks // _PARALLEL_BLOCKS))
    edges = [blocks * i // parts for i in range(parts + 1)]
    if parts == 1:
        quantize(0, blocks)
    else:
        list(quantizer_pool().map(quantize, edges[:-1], edges[1:]))


def quantizer_threads() -> int:
    """Every core this process may run on (llama-quantize's default for ggml's k-quant search, which dominates a
    k-quant merge; the reader and writer threads mostly wait meanwhile)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@cache
def quantizer_pool() -> ThreadPoolExecutor:
    """The threads every quantizer splits its blocks over: the compiled loops and ggml's calls release the GIL."""
    return ThreadPoolExecutor(max_workers=quantizer_threads(), thread_name_prefix="lorastream-quantize")


def _pair_codes(codes: torch.Tensor) -> torch.Tensor:
    """The byte of code pair (codes[b >> 4], codes[b & 15]) for every byte b of two buckets."""
    byte = torch.arange(256)
    return ((codes[byte >> 4] << 4) | codes[byte & 15]).to(torch.uint8)


def _quantize_4bit_torch(flat: torch.Tensor, bounds: torch.Tensor, blocksize: int) -> tuple[torch.Tensor,
                                                                                           torch.Tensor]:
    """Bucket indices and absmax, as bitsandbytes' default (torch) kernel computes them."""
    full = flat.numel() - flat.numel() % blocksize
    absmax = block_absmax(flat, blocksize)
    blocks = flat[:full].view(-1, blocksize)
    scaled = torch.clamp(blocks * (1.0 / absmax[:len(blocks)].clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if full < flat.numel():  # the tensor's last, partial block: bitsandbytes divides here
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / absmax[-1], -1, 1)])
    return torch.bucketize(scaled, bounds.to(flat.device), out_int32=True), absmax


def block_absmax(values: torch.Tensor, blocksize: int) -> torch.Tensor:
    """The float32 absmax per block that `quantize_4bit` computes (a last, partial block's clamped to 1e-38),
    without quantizing: double quantization needs every block's before the first block is encoded."""
    flat = values.reshape(-1)
    full = flat.numel() - flat.numel() % blocksize
    absmax = flat[:full].view(-1, blocksize).abs().amax(dim=-1)
    if full < flat.numel():
        absmax = torch.cat([absmax, flat[full:].abs().max().clamp(min=1e-38).unsqueeze(0)])
    return absmax


def quantize_int8(values: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' `int8_vectorwise_quant` of `values` [rows, cols] cast to float16, into `out` (its int8
    bytes, row-major); returns the float32 row statistics (SCB)."""
    kernels = compiled()
    if kernels is None or not _host(values):
        half = values.to(torch.float16)
        row_stats = torch.max(half.abs(), dim=1).values.float()
        quantized = torch.round(half * (127.0 / row_stats.unsqueeze(-1))).to(torch.int8)
        out[: quantized.numel()].copy_(quantized.view(torch.uint8).reshape(-1))
        return row_stats
    row_stats = torch.empty(values.shape[0], dtype=torch.float32)
    target = out[: values.numel()].view(torch.int8).view(values.shape)
    kernels.quantize_int8(values.contiguous().numpy(), target.numpy(), row_stats.numpy())
    return row_stats
