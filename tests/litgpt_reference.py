"""Tiny LitGPT checkpoints and LoRA runs built by litgpt itself, and merged by `litgpt merge_lora`: the reference.

Runs under .venv-litgpt's interpreter (litgpt pins an older huggingface-hub than lorastream's environment), once
for all cases: `python litgpt_reference.py CASES.json`. Each case is a folder under the JSON's `root`:
  base/        lit_model.pth (the non-LoRA weights, under their base names) + model_config.yaml + tokenizer;
               with `tied`, lm_head equals the embedding, as in a checkpoint converted from a tied model
  run/         lit_model.pth.lora ({"model": LoRA tensors only}) + hyperparameters.yaml + copied configs,
               as `litgpt finetune lora` leaves a run; lorastream merges this one
  reference/   a copy of run/ in which `litgpt merge_lora` wrote lit_model.pth
  reference_hf/model.pth  the merged model under Hugging Face names, by litgpt's `convert_lit_checkpoint`
               (reference_hf/error.txt instead, when litgpt's converter fails on the model)
  logits.pt    LitGPT's merged model on fixed tokens (float32 cases)
  legacy_*     the same model in the legacy interleaved qkv layout (attn.attn, litgpt <= 0.5.4), made with
               litgpt's own conversion, and the reference merged tensors in that layout
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from litgpt import Config as BaseConfig
from litgpt.lora import GPT, Config
from litgpt.model import GPT as BaseGPT
from litgpt.scripts.convert_lit_checkpoint import convert_lit_checkpoint
from litgpt.scripts.convert_lit_checkpoint import qkv_reassemble as to_interleaved
from litgpt.scripts.merge_lora import merge_lora
from litgpt.utils import save_config

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
PRECISION = {torch.bfloat16: "bf16-true", torch.float32: "bf16-mixed"}
FILES = {"tokenizer.json": "{}", "tokenizer_config.json": "{}"}


def write_checkpoint_files(folder: Path, config: BaseConfig) -> None:
    folder.mkdir(parents=True)
    save_config(config, folder)
    for name, text in FILES.items():
        (folder / name).write_text(text)


def write_run(folder: Path, base: Path, lora: dict[str, torch.Tensor], options: dict, dtype: torch.dtype) -> None:
    folder.mkdir(parents=True)
    torch.save({"model": lora}, folder / "lit_model.pth.lora")
    for name in ("model_config.yaml", *FILES):
        shutil.copy(base / name, folder / name)
    hyperparameters = {"checkpoint_dir": str(base), "precision": PRECISION[dtype], "quantize": None,
                       "lora_dropout": 0.0, **options}
    (folder / "hyperparameters.yaml").write_text(yaml.safe_dump(hyperparameters))


def legacy(state: dict[str, torch.Tensor], config: BaseConfig) -> dict[str, torch.Tensor]:
    """The same tensors in litgpt <= 0.5.4's layout: `attn.attn`, q/k/v interleaved per query group."""
    return {k.replace(".attn.qkv.", ".attn.attn."): to_interleaved(v, config) if ".attn.qkv.weight" in k else v
            for k, v in state.items()}


def build(root: Path, case: dict) -> None:
    """A case's `config` is a whole LitGPT config, or, with `name`, the overrides of that named one."""
    if "name" in case:
        base_config = BaseConfig.from_name(case["name"], **case["config"])
        lora_config = Config.from_name(case["name"], **case["config"], **case["lora"])
    else:
        base_config, lora_config = BaseConfig(**case["config"]), Config(**case["config"], **case["lora"])
    base_dtype, lora_dtype = DTYPES[case["base_dtype"]], DTYPES[case["lora_dtype"]]
    torch.manual_seed(case["seed"])
    model = GPT(lora_config)
    generator = torch.Generator().manual_seed(case["seed"] + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:  # trained, non-zero B
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
        if case.get("tied"):  # as litgpt converts a model whose Hugging Face form ties lm_head to the embedding
            model.lm_head.linear.weight.copy_(model.transformer.wte.weight)
    state = model.state_dict()
    base = {k.replace("linear.", ""): v.to(base_dtype) for k, v in state.items() if "lora_" not in k}
    lora = {k: v.to(lora_dtype) for k, v in state.items() if "lora_" in k}
    write_checkpoint_files(root / "base", base_config)
    torch.save(base, root / "base" / "lit_model.pth")
    write_run(root / "run", root / "base", lora, case["lora"], lora_dtype)
    shutil.copytree(root / "run", root / "reference")
    merge_lora(root / "reference")
    merged = torch.load(root / "reference" / "lit_model.pth", weights_only=True)
    if case.get("hf"):
        try:
            convert_lit_checkpoint(root / "reference", root / "reference_hf")
        except Exception as exc:  # a converter bug is recorded for the test to judge
            (root / "reference_hf").mkdir(exist_ok=True)
            (root / "reference_hf" / "error.txt").write_text(f"{type(exc).__name__}: {exc}")
    if case.get("logits"):
        reference = BaseGPT(base_config)
        reference.load_state_dict(merged)
        tokens = torch.randint(0, base_config.padded_vocab_size, (2, 12), generator=generator)
        with torch.no_grad():
            torch.save({"tokens": tokens, "logits": reference(tokens)}, root / "logits.pt")
    if case.get("legacy"):
        write_checkpoint_files(root / "legacy_base", base_config)
        torch.save(legacy(base, base_config), root / "legacy_base" / "lit_model.pth")
        renamed = {k.replace(".attn.qkv.", ".attn.attn."): v for k, v in lora.items()}
        write_run(root / "legacy_run", root / "legacy_base", renamed, case["lora"], lora_dtype)
        torch.save(legacy(merged, base_config), root / "legacy_reference.pth")


def build_cases(build_case: Callable[[Path, dict], None]) -> None:
    """Build each case of the spec file named on the command line (written by the test that runs this script)."""
    spec = json.loads(Path(sys.argv[1]).read_text())
    for name, case in spec["cases"].items():
        build_case(Path(spec["root"]) / name, case)


if __name__ == "__main__":
    build_cases(build)
