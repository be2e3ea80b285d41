"""How fast could a merge be on this machine? The compute floor of the merge arithmetic, and the I/O floor.

Compute, on one bf16 weight (default 5632x2048, a 2gb MLP projection) and a rank-16 LoRA, at torch's default
thread count, each the best of ``--repeats`` timings:

``naive``
    The whole tensor at once, as a loaded model merges: ``(W.float() + s * (B @ A)).to(bf16)``.
``blocked``
    The engine's way, with the engine's own kernel (``lorastream.engine._LoadedDelta.add_rows``): row blocks of
    the planner's largest block (``MAX_BLOCK_ELEMENTS`` elements, about the size of L2), each decoded bf16 ->
    into a reused fp32 buffer, ``+= s * B[rows] @ A`` in place, checked finite (``sum``) and rounded back into
    a reused bf16 buffer. Its phases are timed apart too (``decode``, ``delta``, ``check``, ``encode``).

Throughput is bf16 bytes of the weight per second. With ``--copy DIR``, the I/O floor: ``cp -r`` of ``DIR``
after reading it once (warm page cache, as the benchmark runs), in bytes per second.

    .venv/bin/python benchmarks/floor.py --copy /tmp/lsbench/2gb/hf-base --json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lorastream.engine import _LoadedDelta, row_blocks
from lorastream.planner import MAX_BLOCK_ELEMENTS

LORA_R = 16
LORA_SCALE = 2.0  # alpha / r of the benchmark adapters


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of ``repeats`` calls (after one warm-up call): the floor, not the average."""
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def compute_floor(rows: int, cols: int, repeats: int) -> dict[str, float]:
    """Seconds and GB/s of the naive and the blocked merge of one ``rows x cols`` bf16 weight."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(rows, cols, generator=generator).mul_(0.02).to(torch.bfloat16)
    a = torch.randn(LORA_R, cols, generator=generator).mul_(cols**-0.5)
    b = torch.randn(rows, LORA_R, generator=generator).mul_(0.01)
    delta = _LoadedDelta(a, b, LORA_SCALE, transposed=False, row_offset=None)
    block_rows = max(1, MAX_BLOCK_ELEMENTS // cols)
    blocks = list(row_blocks(rows, block_rows))
    work = torch.empty(block_rows * cols, dtype=torch.float32)
    scratch = torch.empty(block_rows * cols, dtype=torch.float32)
    out = torch.empty(block_rows * cols, dtype=torch.bfloat16)

    def naive() -> torch.Tensor:
        return (weight.float() + LORA_SCALE * (b @ a)).to(torch.bfloat16)

    def views(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = (stop - start) * cols
        return work[:n].view(stop - start, cols), out[:n].view(stop - start, cols)

    def decode() -> None:
        for start, stop in blocks:
            views(start, stop)[0].copy_(weight[start:stop])

    def add_delta() -> None:
        for start, stop in blocks:
            delta.add_rows(views(start, stop)[0], scratch, start, stop)

    def check() -> None:
        for start, stop in blocks:
            views(start, stop)[0].sum().item()

    def encode() -> None:
        for start, stop in blocks:
            w, o = views(start, stop)
            o.copy_(w)

    def blocked() -> None:
        for start, stop in blocks:
            w, o = views(start, stop)
            w.copy_(weight[start:stop])
            delta.add_rows(w, scratch, start, stop)
            w.sum().item()
            o.copy_(w)

    gigabytes = weight.numel() * weight.element_size() / 1e9
    result: dict[str, float] = {"rows": rows, "cols": cols, "rank": LORA_R, "block_rows": block_rows,
                                "threads": torch.get_num_threads(), "weight_gb": gigabytes}
    for name, fn in (("naive", naive), ("blocked", blocked), ("decode", decode), ("delta", add_delta),
                     ("check", check), ("encode", encode)):
        seconds = best_seconds(fn, repeats)
        result[f"{name}_s"] = seconds
        result[f"{name}_gbps"] = gigabytes / seconds
    return result


def io_floor(folder: Path, repeats: int) -> dict[str, float]:
    """Seconds and GB/s of ``cp -r folder`` from a warm page cache, and of the same copy made durable (``sync``
    of the copied files, as lorastream fsyncs its shards). The copy is removed after each run."""
    files = sorted(str(p) for p in folder.rglob("*") if p.is_file())
    nbytes = sum(Path(f).stat().st_size for f in files)
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
    with tempfile.TemporaryDirectory(dir=folder.parent.parent, prefix="floor-") as tmp:
        target = Path(tmp) / "copy"

        def copy(durable: bool = False) -> None:
            shutil.rmtree(target, ignore_errors=True)
            subprocess.run(["cp", "-r", str(folder), str(target)], check=True)
            if durable:
                subprocess.run(["sync", *map(str, target.iterdir())], check=True)

        seconds = best_seconds(copy, repeats)
        durable = best_seconds(lambda: copy(durable=True), repeats)
    return {"dir": str(folder), "bytes": nbytes, "cp_s": seconds, "cp_gbps": nbytes / 1e9 / seconds,
            "cp_sync_s": durable, "cp_sync_gbps": nbytes / 1e9 / durable}


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=5632)
    parser.add_argument("--cols", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5, help="timings per measurement (the best is kept)")
    parser.add_argument("--copy", type=Path, help="also time cp -r of this folder (the I/O floor)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    result: dict[str, object] = {"compute": compute_floor(args.rows, args.cols, args.repeats)}
    if args.copy:
        result["io"] = io_floor(args.copy.resolve(), max(1, args.repeats // 2))
    if args.json:
        print(json.dumps(result))
        return 0
    c = result["compute"]
    assert isinstance(c, dict)
    print(f"{c['rows']}x{c['cols']} bf16 ({c['weight_gb'] * 1e3:.1f} MB), rank {c['rank']}, "
          f"{c['threads']} threads, blocks of {c['block_rows']} rows:")
    for name in ("naive", "blocked", "decode", "delta", "check", "encode"):
        print(f"  {name:<8} {c[f'{name}_s'] * 1e3:8.2f} ms  {c[f'{name}_gbps']:6.2f} GB/s")
    if "io" in result:
        io = result["io"]
        assert isinstance(io, dict)
        print(f"cp -r {io['dir']}: {io['bytes'] / 1e9:.2f} GB in {io['cp_s']:.2f} s, {io['cp_gbps']:.2f} GB/s; "
              f"with sync: {io['cp_sync_s']:.2f} s, {io['cp_sync_gbps']:.2f} GB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
