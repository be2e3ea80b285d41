"""LitGPT's side of tests/test_extract.py, run under .venv-litgpt's interpreter (see litgpt_reference.py).

`python litgpt_adapter_reference.py SPEC.json`: for each case, a LitGPT LoRA `GPT` with trained
(random, non-zero) LoRA weights, and under the case's folder:
  base/          the base checkpoint (non-LoRA weights under their base names) + model_config.yaml + tokenizer
  whole/lit_model.pth   the GPT's whole state dict (base and LoRA weights), as a training loop might save it
  reference/     the run folder `litgpt finetune lora` writes (LoRA tensors kept by `lora_filter`), merged by
                 `litgpt merge_lora` into reference/lit_model.pth
  extracted/     `lorastream.extract` of whole/lit_model.pth (with the case's `extract` options), then merged
                 by `litgpt merge_lora`
  saved/         `lorastream.save_lora(model, ...)` called on the live GPT, then merged by `litgpt merge_lora`
  base_hf/model.pth, reference_hf/model.pth   (cases with "hf") the base and the merged model under Hugging Face
                 names, by litgpt's `convert_lit_checkpoint`
lorastream runs in this interpreter too (it imports in litgpt's environment), so litgpt is imported once.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from litgpt import Config as BaseConfig
from litgpt.lora import GPT, Config, lora_filter
from litgpt.scripts.convert_lit_checkpoint import convert_lit_checkpoint
from litgpt.scripts.merge_lora import merge_lora
from litgpt_reference import build_cases, write_checkpoint_files, write_run

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import lorastream  # imports in litgpt's environment: it needs no package litgpt lacks

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def build(root: Path, case: dict) -> None:
    dtype = DTYPES[case["dtype"]]
    torch.manual_seed(case["seed"])
    model = GPT(Config(**case["config"], **case["lora"])).to(dtype)
    generator = torch.Generator().manual_seed(case["seed"] + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if lora_filter(name, param):
                param.copy_((torch.randn(param.shape, generator=generator) * 0.1).to(dtype))
    state = model.state_dict()
    write_checkpoint_files(root / "base", BaseConfig(**case["config"]))
    torch.save({k.replace("linear.", ""): v for k, v in state.items() if not lora_filter(k, v)},
               root / "base" / "lit_model.pth")
    (root / "whole").mkdir()
    torch.save(state, root / "whole" / "lit_model.pth")
    write_run(root / "reference", root / "base", {k: v for k, v in state.items() if lora_filter(k, v)},
              case["lora"], dtype)
    if case.get("hyperparameters_beside"):  # a training run's folder that also holds the whole model
        shutil.copy(root / "reference" / "hyperparameters.yaml", root / "whole")
    merge_lora(root / "reference")
    extract = {k: str(root / v) if k == "base" else v for k, v in case["extract"].items()}
    lorastream.extract(root / "whole" / "lit_model.pth", root / "extracted", **extract)
    merge_lora(root / "extracted")
    lorastream.save_lora(model, root / "saved", format="litgpt", base=root / "base")
    merge_lora(root / "saved")
    if case.get("hf"):
        convert_lit_checkpoint(root / "base", root / "base_hf")
        convert_lit_checkpoint(root / "reference", root / "reference_hf")


if __name__ == "__main__":
    build_cases(build)
