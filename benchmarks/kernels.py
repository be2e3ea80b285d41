"""How close to memory speed are the codec kernels? Each kernel against a copy of the same bytes.

For one weight (default 5632x2048, a 2gb MLP projection; random values), in the engine's row blocks (about
``MAX_BLOCK_ELEMENTS`` values each), on one thread, each timing the best of ``--repeats`` passes after a warm-up
pass (which is also where numba's compiled code is loaded):

``decode nf4 -> bf16`` / ``-> fp32``
    ``kernels.decode_4bit``: packed nibbles and float32 absmax to values, as a NF4 base is read.
``quantize nf4``
    ``Quantizer4.quantize``: float32 values to packed nibbles and per-block absmax (``--quantize nf4``).
``double quant``
    ``quantize_nested``: the per-block absmax to 8-bit codes (torch on every path; 1/64 of the values).
``quantize int8``
    ``kernels.quantize_int8``: float32 rows to LLM.int8 codes and row statistics (``--quantize int8``).

Each runs on the paths given by ``--paths`` (``numba``: compiled, ``torch``: the fallback; set through
``LORASTREAM_KERNELS``), and, on the CPU, bitsandbytes' own function for the same job (its CPU backend) for
comparison. ``copy`` is ``torch.Tensor.copy_`` of a buffer as large as the kernel's reads and writes together,
halved (a copy of N bytes reads N and writes N): the kernel's physical floor. The table gives values per
second, GB/s of the kernel's own traffic, and its time over the copy's.

    .venv/bin/python benchmarks/kernels.py                      # CPU, both paths
    .venv/bin/python benchmarks/kernels.py --device cuda --paths torch   # on a GPU: the torch path there
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable

import torch

from lorastream.codecs import bnb4, kernels
from lorastream.planner import MAX_BLOCK_ELEMENTS


def best_seconds(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return min(times)


def copy_seconds(nbytes: int, repeats: int, device: torch.device) -> float:
    """The fastest copy of `nbytes` bytes into a second buffer."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return best_seconds(lambda: dst.copy_(src), repeats, device)


def cases(rows: int, cols: int, device: torch.device) -> dict[str, tuple[int, int, Callable[[], object],
                                                                          Callable[[], object] | None]]:
    """name -> (bytes read, bytes written, our kernel over the weight's row blocks, bitsandbytes' function on the
    whole weight or None)."""
    import bitsandbytes as bnb

    numel = rows * cols
    step = max(1, MAX_BLOCK_ELEMENTS // cols) * cols  # elements per row block, as the engine reads
    starts = range(0, numel, step)
    values = (torch.randn(numel, generator=torch.Generator().manual_seed(0)) * 0.02).to(device)
    quantizer = bnb4.Quantizer4("nf4", 64)
    packed = torch.empty((numel + 1) // 2, dtype=torch.uint8, device=device)
    _, absmax = quantizer.quantize(values, packed)
    code = quantizer.code.to(device)
    blocks = absmax.numel()
    out = torch.empty(numel, dtype=torch.uint8, device=device)
    on_cpu = device.type == "cpu"
    cpu_values = values.cpu().view(rows, cols)
    ref = {dtype: bnb.functional.quantize_4bit(cpu_values.to(dtype), blocksize=64, quant_type="nf4",
                                               compress_statistics=False) for dtype in (torch.bfloat16, torch.float32)}

    def decode(dtype: torch.dtype) -> None:
        for first in starts:
            count = min(step, numel - first)
            kernels.decode_4bit(packed[first // 2:(first + count + 1) // 2], code, absmax[first // 64:], 64, count,
                                dtype)

    def quantize_4bit() -> None:
        for first in starts:
            quantizer.quantize(values[first:first + step], out[first // 2:])

    def quantize_int8() -> None:
        for first in starts:
            kernels.quantize_int8(values[first:first + step].view(-1, cols), out[first:])

    return {
        "decode nf4 -> bf16": (numel // 2 + blocks * 4, numel * 2, lambda: decode(torch.bfloat16),
                               (lambda: bnb.functional.dequantize_4bit(*ref[torch.bfloat16])) if on_cpu else None),
        "decode nf4 -> fp32": (numel // 2 + blocks * 4, numel * 4, lambda: decode(torch.float32),
                               (lambda: bnb.functional.dequantize_4bit(*ref[torch.float32])) if on_cpu else None),
        "quantize nf4": (numel * 4, numel // 2 + blocks * 4, quantize_4bit,
                         (lambda: bnb.functional.quantize_4bit(cpu_values, blocksize=64, quant_type="nf4",
                                                               compress_statistics=False)) if on_cpu else None),
        "double quant": (blocks * 4, blocks, lambda: bnb4.quantize_nested(absmax.cpu()), None),
        "quantize int8": (numel * 4, numel + rows * 4, quantize_int8,
                          (lambda: bnb.functional.int8_vectorwise_quant(cpu_values.to(torch.float16)))
                          if on_cpu else None),
    }


def measure(rows: int, cols: int, device: torch.device, paths: list[str], repeats: int) -> list[dict[str, object]]:
    results: list[dict[str, object]] = []
    for path in paths:
        os.environ[kernels.ENV] = path
        kernels.compiled.cache_clear()
        started = time.perf_counter()
        kernels.compiled()
        load = time.perf_counter() - started
        for name, (read, written, ours, reference) in cases(rows, cols, device).items():
            first = time.perf_counter()
            ours()
            first_call = time.perf_counter() - first
            seconds = best_seconds(ours, repeats, device)
            traffic = read + written
            copy = copy_seconds(traffic // 2, repeats, device)
            row: dict[str, object] = {
                "kernel": name, "path": path, "device": str(device), "elements": rows * cols,
                "seconds": seconds, "values_per_s": rows * cols / seconds, "gb_per_s": traffic / seconds / 1e9,
                "copy_seconds": copy, "x_copy": seconds / copy, "first_call_seconds": first_call,
                "import_seconds": load}
            if reference is not None and path == paths[0]:
                row["bitsandbytes_values_per_s"] = rows * cols / best_seconds(reference, repeats, device)
            results.append(row)
    return results


def render(results: list[dict[str, object]]) -> str:
    lines = ["| kernel | path | values/s | GB/s | x copy | bitsandbytes values/s |", "|---|---|---:|---:|---:|---:|"]
    for r in results:
        bnb_rate = r.get("bitsandbytes_values_per_s")
        lines.append(f"| {r['kernel']} | {r['path']} | {r['values_per_s'] / 1e6:,.0f} M | {r['gb_per_s']:.2f} | "
                     f"{r['x_copy']:.1f} | {f'{bnb_rate / 1e6:,.0f} M' if bnb_rate else '-'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=5632)
    parser.add_argument("--cols", type=int, default=2048)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (on cuda the torch path runs)")
    parser.add_argument("--paths", default="numba,torch", help="kernel paths to time: numba,torch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch's intra-op threads (default one core)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results = measure(args.rows, args.cols, device, args.paths.split(","), args.repeats)
    print(json.dumps(results, indent=2) if args.json else render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
