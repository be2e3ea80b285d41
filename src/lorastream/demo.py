"""`lorastream demo`: a small random Llama-style model and PEFT adapter, merged and checked against PEFT."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .memory import format_size

CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 512, "intermediate_size": 1376,
    "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 64,
    "vocab_size": 32000, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "hidden_act": "silu", "tie_word_embeddings": False, "dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _linear_shapes() -> dict[str, tuple[int, int]]:
    h, i, kv = CONFIG["hidden_size"], CONFIG["intermediate_size"], CONFIG["num_key_value_heads"] * CONFIG["head_dim"]
    return {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
            "self_attn.o_proj": (h, h), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}


def build_demo_model(folder: Path, seed: int = 0) -> None:
    """A random bf16 LlamaForCausalLM checkpoint in two shards."""
    gen = torch.Generator().manual_seed(seed)
    h, vocab = CONFIG["hidden_size"], CONFIG["vocab_size"]
    tensors = {"model.embed_tokens.weight": torch.randn(vocab, h, generator=gen) * 0.02,
               "model.norm.weight": torch.ones(h), "lm_head.weight": torch.randn(vocab, h, generator=gen) * 0.02}
    for layer in range(CONFIG["num_hidden_layers"]):
        prefix = f"model.layers.{layer}"
        tensors[f"{prefix}.input_layernorm.weight"] = torch.ones(h)
        tensors[f"{prefix}.post_attention_layernorm.weight"] = torch.ones(h)
        for name, shape in _linear_shapes().items():
            tensors[f"{prefix}.{name}.weight"] = torch.randn(*shape, generator=gen) / shape[1] ** 0.5
    names = list(tensors)
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, part in enumerate(halves, 1):
        filename = f"model-{i:05d}-of-00002.safetensors"
        save_file({n: tensors[n].to(torch.bfloat16).contiguous() for n in part}, folder / filename,
                  metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, filename))
    total = sum(t.numel() * 2 for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (folder / "config.json").write_text(json.dumps(CONFIG, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))


def build_demo_adapter(folder: Path, rank: int = 8, alpha: int = 16, seed: int = 1) -> None:
    """A PEFT LoRA adapter on all seven projections with non-zero B, saved in float32 as PEFT does."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(CONFIG["num_hidden_layers"]):
        for name, (out_features, in_features) in _linear_shapes().items():
            key = f"base_model.model.model.layers.{layer}.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, in_features, generator=gen) / in_features**0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_features, rank, generator=gen) * 0.01
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
              "target_modules": list(TARGETS), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
              "base_model_name_or_path": None, "inference_mode": True}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))


def compare_with_peft(base: Path, adapter: Path, merged: Path) -> tuple[int, int] | None:
    """(tensors compared, tensors differing) against PEFT's merge_and_unload; None without transformers/peft."""
    try:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
    except ImportError:
        return None
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    reference = PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()
    ours: dict[str, torch.Tensor] = {}
    for path in sorted(merged.glob("*.safetensors")):
        ours.update(load_file(path))
    differing = sum(1 for name, tensor in reference.items() if not torch.equal(ours[name], tensor))
    return len(reference), differing


def run_demo(max_memory: str, keep: str | None, echo: Callable[[str], None]) -> int:
    with tempfile.TemporaryDirectory(prefix="lorastream-demo-") as tmp:
        root = Path(keep) if keep else Path(tmp)
        base, adapter, out = root / "base", root / "adapter", root / "merged"
        build_demo_model(base)
        build_demo_adapter(adapter)
        echo(f"built a random Llama-style model ({format_size(sum(p.stat().st_size for p in base.iterdir()))}) "
             f"and a rank-8 PEFT adapter in {root}")
        # A fresh process, so that its peak RSS is the merge's alone, not the model building's above.
        command = [sys.executable, "-m", "lorastream", "merge", str(base), str(adapter), "-o", str(out),
                   "--max-memory", max_memory, "--max-shard-size", "40MB", "--overwrite", "--json", "--quiet"]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            echo(done.stderr.strip())
            return done.returncode
        result = json.loads(done.stdout)
        echo(f"merged into {out}: {', '.join(result['files'])}")
        echo(f"{format_size(result['bytes_written'])} in {result['seconds']:.2f} s; Memory used: peak RSS "
             f"{format_size(result['peak_rss'])} of a {format_size(result['budget'])} budget")
        checked = compare_with_peft(base, adapter, out)
        if checked is None:
            echo("peft/transformers not installed: skipped the comparison with PEFT's merge_and_unload")
            return 0
        total, differing = checked
        echo(f"compared with PEFT merge_and_unload: {total - differing}/{total} tensors bit-identical")
        return 0 if differing == 0 else 1
