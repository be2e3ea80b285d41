"""Every table of dtype names lorastream reads or writes, in one place: the names config.json and `--dtype`
use, safetensors' header names, torch's pickled storage classes and LitGPT's precision settings."""

from __future__ import annotations

from typing import Any

import torch

# Floating dtypes by the names config.json ("dtype", "torch_dtype") and the --dtype option use.
FLOAT_DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16,
                                        "float32": torch.float32}

# safetensors header names.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}

# The typed storage classes a torch pickle (torch.save, legacy format) names.
STORAGE_DTYPES: dict[str, torch.dtype] = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}

# LitGPT's `precision` setting for weights of each dtype (hyperparameters.yaml).
LITGPT_PRECISIONS: dict[torch.dtype, str] = {torch.bfloat16: "bf16-true", torch.float16: "16-true",
                                             torch.float32: "32-true"}

SAFETENSORS_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
STORAGE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in STORAGE_DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """The config.json name of a floating dtype ("bfloat16")."""
    return str(dtype).removeprefix("torch.")


def config_dtype(config: dict[str, Any], default: torch.dtype) -> torch.dtype:
    """The dtype a config.json records (`dtype`, or the older `torch_dtype`), else `default`."""
    return FLOAT_DTYPES.get(config.get("dtype") or config.get("torch_dtype") or "", default)

# GGUF tensor types (ggml's names, as `gguf.GGMLQuantizationType` spells them) by the `--dtype` names of the dense
# types and the `--quantize` names lorastream takes with `--format gguf` (llama-quantize's presets, lower case).
GGUF_DENSE_TYPES: dict[str, str] = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
GGUF_QUANT_PRESETS: tuple[str, ...] = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k_m", "q5_k_m", "q6_k")
# The torch dtype a dense GGUF type is written from.
GGUF_TORCH_DTYPES: dict[str, torch.dtype] = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
