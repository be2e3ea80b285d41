"""Merge a PEFT LoRA adapter the way most users do: load, ``merge_and_unload()``, ``save_pretrained``.

This is the PEFT baseline of the lorastream benchmark:

    python benchmarks/peft_merge.py BASE_DIR ADAPTER_DIR OUT_DIR

It loads the whole base model in bf16, so its peak memory is at least the model size.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def merge(base: Path, adapter: Path, out: Path) -> None:
    """Load ``base`` in bf16, apply ``adapter``, merge it into the weights and save to ``out``."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(model, adapter)
    merged = model.merge_and_unload()
    merged.save_pretrained(out)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base", type=Path, help="Hugging Face model folder")
    parser.add_argument("adapter", type=Path, help="PEFT LoRA adapter folder")
    parser.add_argument("out", type=Path, help="output folder for the merged model")
    args = parser.parse_args(argv)
    merge(args.base, args.adapter, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
