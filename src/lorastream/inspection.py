"""`inspect`: describe a model folder, an adapter folder, a LitGPT run or checkpoint, or a weight file, from
headers only."""

from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

from .adapters.peft import read_peft_adapter
from .codecs.plain import TensorRef
from .errors import InputError
from .formats.gguf import GGUFArray, GGUFHeader, read_gguf_header, type_name
from .formats.hf import open_hf_model, read_json
from .formats.litgpt import CONFIG_FILE, MODEL_FILE, LoraRun, is_lora_run, open_litgpt_model, read_lora_run
from .formats.safetensors import read_header
from .formats.torchzip import read_state_dict
from .io.locations import location
from .litgpt import family_of


def _summarize_tensors(tensors: dict[str, TensorRef]) -> dict[str, Any]:
    dtypes = Counter(str(ref.dtype).removeprefix("torch.") for ref in tensors.values())
    return {"tensors": len(tensors), "parameters": sum(r.numel for r in tensors.values()),
            "bytes": sum(r.nbytes for r in tensors.values()), "dtypes": dict(dtypes),
            "tensor_list": [{"name": n, "dtype": str(r.dtype).removeprefix("torch."), "shape": list(r.shape)}
                            for n, r in tensors.items()]}


def inspect(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Describe a model folder, an adapter folder or a single weight file (headers only)."""
    path = location(path)
    if path.is_dir() and (path / "adapter_config.json").is_file():
        adapter = read_peft_adapter(path)
        refs = {**{f"{m}.lora_A": lora.a for m, lora in adapter.modules.items()},
                **{f"{m}.lora_B": lora.b for m, lora in adapter.modules.items()}, **adapter.replacements,
                **{f"{m}.{part}": ref for m, parts in adapter.unresolved.items() for part, ref in parts.items()},
                **{f"{m}.trainable_tokens": values for m, (values, _) in adapter.token_rows.items()}}
        config = adapter.config
        return {"path": str(path), "format": "peft-lora", **_summarize_tensors(refs),
                "r": config.get("r"), "lora_alpha": config.get("lora_alpha"),
                "use_rslora": bool(config.get("use_rslora")), "use_dora": bool(config.get("use_dora")),
                "rank_pattern": config.get("rank_pattern") or {}, "alpha_pattern": config.get("alpha_pattern") or {},
                "target_modules": config.get("target_modules"), "modules_to_save": config.get("modules_to_save"),
                "base_model": config.get("base_model_name_or_path"),
                "modules": {m: {"rank": lora.rank, "scale": lora.scale, "embedding": lora.embedding,
                                "dora": lora.magnitude is not None, "lora_bias": lora.bias is not None}
                            for m, lora in adapter.modules.items()},
                "replacements": sorted(adapter.replacements),
                # with target_parameters, which module is a ParamWrapper (and of which parameter) needs the base model
                "target_parameters": config.get("target_parameters"), "unresolved_modules": sorted(adapter.unresolved),
                "trainable_tokens": {m: list(indices) for m, (_, indices) in adapter.token_rows.items()}}
    if path.is_dir() and is_lora_run(path):
        return _inspect_lora_run(read_lora_run(path))
    if path.is_dir() and (path / MODEL_FILE).is_file() and (path / CONFIG_FILE).is_file():
        model = open_litgpt_model(path)
        return {"path": str(path), "format": "litgpt", **_describe_litgpt_config(model.config, path / CONFIG_FILE),
                **_summarize_tensors(model.tensors), "files": [p.name for p in model.weight_files]}
    if path.is_dir():
        model = open_hf_model(path)
        quantized = {n: src for n, src in model.sources.items() if not isinstance(src, TensorRef)}
        return {"path": str(path), "format": f"hf-{model.weight_format}", **_summarize_tensors(model.tensors),
                "model_type": model.model_type, "architectures": model.config.get("architectures"),
                "quantization": model.config.get("quantization_config"),
                "quantized_weights": len(quantized),
                "quantized_bytes_on_disk": sum(src.stored_bytes for src in quantized.values()),
                "quantized_bytes_dequantized": sum(src.numel * src.dense_dtype.itemsize for src in quantized.values()),
                "files": [p.name for p in model.weight_files]}
    if path.suffix == ".gguf":
        return _inspect_gguf(read_gguf_header(path))  # type: ignore[arg-type]
    if path.suffix == ".safetensors":
        header = read_header(path)
        return {"path": str(path), "format": "safetensors", **_summarize_tensors(header.tensors),
                "metadata": header.metadata}
    if path.suffix in (".bin", ".pth", ".pt", ".lora"):
        return {"path": str(path), "format": "torch-zip", **_summarize_tensors(read_state_dict(path))}
    if path.suffix == ".json":
        return {"path": str(path), "format": "json", "content": read_json(path)}
    raise InputError(f"{path}: not a model folder, adapter folder or weight file")


_LORA_PARTS = ("query", "key", "value", "projection", "mlp", "head")


def _describe_litgpt_config(config: dict[str, Any], where: Path) -> dict[str, Any]:
    try:
        family: str | None = family_of(config, str(where)).architecture
    except InputError:
        family = None  # not exportable with --format hf; still mergeable into lit_model.pth
    return {"model": config.get("name"), "hf_architecture": family,
            **{key: config.get(key) for key in ("n_layer", "n_embd", "n_head", "n_query_groups", "head_size",
                                                "intermediate_size", "padded_vocab_size", "mlp_class_name")}}


def _inspect_lora_run(run: LoraRun) -> dict[str, Any]:
    hparams = run.hyperparameters
    return {"path": str(run.path), "format": "litgpt-lora", **_summarize_tensors(run.tensors),
            "lora_r": hparams["lora_r"], "lora_alpha": hparams["lora_alpha"],
            "scale": hparams["lora_alpha"] / hparams["lora_r"],
            "enabled": [part for part in _LORA_PARTS if hparams.get(f"lora_{part}")],
            "checkpoint_dir": hparams.get("checkpoint_dir"), "precision": hparams.get("precision"),
            "quantize": hparams.get("quantize"), **_describe_litgpt_config(run.config, run.path / CONFIG_FILE),
            "merged": str(run.path / MODEL_FILE) if (run.path / MODEL_FILE).is_file() else None}


def _inspect_gguf(header: GGUFHeader) -> dict[str, Any]:
    """A GGUF's architecture, tensor types and counts, bytes, tokenizer and other metadata (arrays by length)."""
    meta = header.metadata
    types = Counter(type_name(t.type_id) for t in header.tensors)
    size = header.path.stat().st_size
    arrays = {k: v.length for k, v in meta.items() if isinstance(v, GGUFArray)}
    return {"path": str(header.path), "format": f"gguf-v{header.version}",
            "architecture": meta.get("general.architecture"), "name": meta.get("general.name"),
            "file_type": meta.get("general.file_type"), "tensors": len(header.tensors),
            "parameters": sum(math.prod(t.ggml_shape) for t in header.tensors), "bytes": size - header.data_start,
            "header_bytes": header.data_start, "types": dict(types),
            "tokenizer": {"model": meta.get("tokenizer.ggml.model"), "pre": meta.get("tokenizer.ggml.pre"),
                          "tokens": arrays.get("tokenizer.ggml.tokens"), "merges": arrays.get("tokenizer.ggml.merges"),
                          **{k.removeprefix("tokenizer.ggml."): v for k, v in meta.items()
                             if k.startswith("tokenizer.ggml.") and k.endswith(("_id", "_token"))},
                          "chat_template": "tokenizer.chat_template" in meta},
            "metadata": {k: v for k, v in meta.items() if not isinstance(v, GGUFArray)
                         and not k.startswith("tokenizer.")},
            "tensor_list": [{"name": t.name, "dtype": type_name(t.type_id), "shape": list(t.shape)}
                            for t in header.tensors]}
