"""The LoRA product `B @ A` in bfloat16 or float16 on the CPU: bit for bit `torch.mm`, about 10x faster.

On a CPU without oneDNN's reduced-precision GEMM (no AVX512), torch multiplies bfloat16/float16 matrices with
its scalar reference kernel (ATen's `gemm_notrans_` and `sum`): each output is a float32 dot product kept in
four interleaved partial sums (partial k adds the products k, k+4, k+8, ... in turn; a rank's remainder goes to
partial 0), then partial 0 += 1, += 2, += 3, rounded once to the dtype. That runs at about 16 M outputs per
second on one core and was most of the time of merging a bf16 adapter (and all of LitGPT's own merge).

The same sums come from float32 matrix products over every fourth rank, added in that order: bf16 and fp16
products are exact in float32, so only the order of the additions matters, and a float32 GEMM with a
four-deep inner dimension adds its four products in turn. No library offers this, hence this module. The first
product of each dtype checks it against `torch.mm` on probes (zeros and signed zeros included); wherever they
differ, or torch has a faster kernel of its own, `torch.mm` is used.
"""

from __future__ import annotations

import functools
import logging
import threading

import torch

log = logging.getLogger(__name__)

PARTIALS = 4  # ATen's `sum` keeps this many partial sums
# Rows per step: two float32 temporaries of at most 1 MiB each, inside the planner's fixed reserve.
CHUNK_ELEMENTS = 1 << 18
REDUCED = (torch.bfloat16, torch.float16)


def upcast(factor: torch.Tensor) -> torch.Tensor | None:
    """`factor` in float32 where `lora_mm` multiplies its dtype through grouped float32 sums, else None: a caller
    multiplying the same factors block after block keeps them, rather than have every product upcast again."""
    grouped = factor.device.type == "cpu" and factor.dtype in REDUCED and _matches_torch(factor.dtype)
    return factor.float() if grouped else None


def lora_mm(b: torch.Tensor, a: torch.Tensor, out: torch.Tensor,
            b32: torch.Tensor | None = None, a32: torch.Tensor | None = None) -> torch.Tensor:
    """`torch.mm(b, a, out=out)`, bit for bit; `b32` and `a32` are the factors' `upcast`, when the caller has them."""
    if b.device.type != "cpu" or b.dtype not in REDUCED or not _matches_torch(b.dtype):
        return torch.mm(b, a, out=out)
    return _grouped_mm(b.float() if b32 is None else b32, a.float() if a32 is None else a32, out)


_scratch = threading.local()


def _chunk_buffers(elements: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two float32 buffers of at least `elements`, kept per thread: fresh ones for every block are page faults
    (above glibc's lowered mmap threshold, see `memory.keep_heap_bounded`) that cost more than the product."""
    buffers = getattr(_scratch, "buffers", None)
    if buffers is None or buffers[0].numel() < elements:
        buffers = _scratch.buffers = (torch.empty(elements), torch.empty(elements))
    return buffers


def _grouped_mm(b32: torch.Tensor, a32: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    rank, cols = a32.shape
    full = rank - rank % PARTIALS
    step = max(1, CHUNK_ELEMENTS // max(1, cols))
    total, part = _chunk_buffers(min(step, b32.shape[0]) * cols)
    for start in range(0, b32.shape[0], step):
        rows = min(step, b32.shape[0] - start)
        chunk = b32[start:start + rows]
        acc, extra = total[:rows * cols].view(rows, cols), part[:rows * cols].view(rows, cols)
        acc.zero_()  # ATen starts every partial sum at +0.0, so a sum of -0.0 products is +0.0
        if full:
            acc.addmm_(chunk[:, 0:full:PARTIALS], a32[0:full:PARTIALS])
        for i in range(full, rank):
            acc.addmm_(chunk[:, i:i + 1], a32[i:i + 1])
        for k in range(1, PARTIALS if full else 1):
            acc.add_(torch.mm(chunk[:, k:full:PARTIALS], a32[k:full:PARTIALS], out=extra))
        out[start:start + rows].copy_(acc)
    return out


@functools.cache
def _matches_torch(dtype: torch.dtype) -> bool:
    """Whether the grouped float32 sums equal torch's own `mm` for `dtype` here (and torch has no faster GEMM)."""
    supported = {torch.bfloat16: torch.ops.mkldnn._is_mkldnn_bf16_supported,
                 torch.float16: torch.ops.mkldnn._is_mkldnn_fp16_supported}[dtype]
    if torch.backends.mkldnn.is_available() and supported():
        return False
    generator = torch.Generator().manual_seed(0)
    same = True
    for rank in (1, 2, 3, 4, 5, 8, 16, 17, 64):
        b = torch.randn(37, rank, generator=generator).to(dtype)
        a = torch.randn(rank, 300, generator=generator).to(dtype)
        b[::3] = 0  # untrained rows: every product a signed zero
        a[:, ::7] = -a[:, ::7].abs()
        for cols in (slice(None), slice(5, 250)):  # the engine multiplies a column slice of A for a transposed delta
            expected = torch.mm(b, a[:, cols])
            got = _grouped_mm(b.float(), a.float()[:, cols], torch.empty_like(expected))
            same &= torch.equal(expected.view(torch.int16), got.view(torch.int16))
    log.debug("LoRA product in %s: %s", dtype, "grouped float32 sums" if same else "torch.mm")
    return same
