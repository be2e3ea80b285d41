"""Merge a PEFT LoRA adapter the way most users do: load, ``merge_and_unload()``, ``save_pretrained``.

This is the PEFT baseline of the lorastream benchmark:

    python benchmarks/peft_merge.py BASE_DIR ADAPTER_DIR OUT_DIR
    python benchmarks/peft_merge.py --quantized NF4_DIR ADAPTER_DIR OUT_DIR

It loads the whole base model in bf16, so its peak memory is at least the model size.

With ``--quantized`` the base is a bitsandbytes (NF4) checkpoint, as a QLoRA user has: it is loaded 4-bit,
dequantized to a dense bf16 model with ``model.dequantize()``, and the adapter is merged into that, so the
output is dense bf16. (Merging into the 4-bit model instead would re-quantize the merged weights.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def merge(base: Path, adapter: Path, out: Path, quantized: bool = False) -> None:
    """Load ``base`` in bf16 (dequantized if ``quantized``), apply ``adapter``, merge it and save to ``out``."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    if quantized:
        if getattr(model, "hf_quantizer", None) is None:
            raise SystemExit(f"--quantized: {base} is not a quantized checkpoint")
        model = model.dequantize()
        left = sorted({type(m).__name__ for m in model.modules() if type(m).__module__.startswith("bitsandbytes")})
        if left:
            raise SystemExit(f"dequantize() left bitsandbytes modules: {', '.join(left)}")
    model = PeftModel.from_pretrained(model, adapter)
    merged = model.merge_and_unload()
    merged.save_pretrained(out)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base", type=Path, help="Hugging Face model folder")
    parser.add_argument("adapter", type=Path, help="PEFT LoRA adapter folder")
    parser.add_argument("out", type=Path, help="output folder for the merged model")
    parser.add_argument("--quantized", action="store_true",
                        help="BASE is a bitsandbytes 4-bit checkpoint: dequantize it to bf16, then merge")
    args = parser.parse_args(argv)
    merge(args.base, args.adapter, args.out, args.quantized)
    return 0


if __name__ == "__main__":
    sys.exit(main())
