"""Make more PEFT adapters for one benchmark base, for `lorastream merge --each`.

Each variant ``WORKDIR/SIZE/peft-adapter-N/`` is ``peft-adapter/`` with its ``lora_B`` tensors redrawn (seed
N): the same modules and ranks, a different update. Built by ``make_models.py`` first.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ADAPTER_FILE = "adapter_model.safetensors"


def make_variant(adapter: Path, out: Path, seed: int) -> None:
    tensors = load_file(adapter / ADAPTER_FILE)
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in tensors.items():
        if "lora_B" in name:
            tensors[name] = (torch.randn(tensor.shape, generator=generator) * 0.02).to(tensor.dtype)
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(adapter, partial, ignore=shutil.ignore_patterns(ADAPTER_FILE))
    save_file(tensors, partial / ADAPTER_FILE, metadata={"format": "pt"})
    partial.rename(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="2gb")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lsbench"))
    parser.add_argument("--count", type=int, default=3, help="variants to make (peft-adapter-1 ... -N)")
    args = parser.parse_args(argv)
    folder = args.workdir / args.size
    for n in range(1, args.count + 1):
        out = folder / f"peft-adapter-{n}"
        if not out.exists():
            make_variant(folder / "peft-adapter", out, n)
            print(f"[make_adapter_variants] wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
