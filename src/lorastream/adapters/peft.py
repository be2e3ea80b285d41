"""PEFT LoRA adapter folders (`adapter_config.json` + `adapter_model.safetensors|.bin`).

Scaling and pattern matching follow peft 0.21 (`LoraConfig`, `get_pattern_key`); options that change the
model in ways a weight merge cannot express are refused rather than merged wrongly.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..codecs.plain import TensorRef
from ..errors import InputError
from ..formats.hf import read_json
from ..formats.safetensors import read_header
from ..formats.torchzip import read_state_dict
from .lora import Adapter, LoraModule, ParameterTarget

PREFIX = "base_model.model."
_LORA_SUFFIXES = {
    ".lora_A.weight": "a",
    ".lora_B.weight": "b",
    ".lora_B.bias": "bias",
    ".lora_embedding_A": "embedding_a",
    ".lora_embedding_B": "embedding_b",
    ".lora_magnitude_vector": "magnitude",
    ".lora_magnitude_vector.weight": "magnitude",
}
# Config fields whose non-empty value means the adapter is not a plain weight update.
_UNMERGEABLE_OPTIONS = {
    "layer_replication": "it duplicates layers, which changes the model's structure",
    "alora_invocation_tokens": "activated LoRA only applies after its invocation tokens; it cannot be merged",
    "megatron_config": "Megatron-parallel LoRA layers are not supported",
    "use_qalora": "QA-LoRA pools inputs; its update is not a plain B @ A",
    "use_bdlora": "block-diagonal LoRA is not supported yet",
    "arrow_config": "Arrow routing chooses adapters per token; it cannot be merged",
}


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """The value of the first pattern matching `module`, as peft's `get_pattern_key` matches."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _adapter_weights(folder: Path) -> dict[str, TensorRef]:
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        path = folder / name
        if path.is_file():
            return read_header(path).tensors if name.endswith(".safetensors") else read_state_dict(path)
    raise InputError(f"{folder}: no adapter weights (expected adapter_model.safetensors or adapter_model.bin)")


def check_config(path: Path, config: dict[str, Any]) -> None:
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise InputError(f"{path}: peft_type is {peft_type!r}; lorastream merges LORA adapters only "
                         "(VeRA, AdaLoRA, LoHa, ... have other update rules)")
    for field in ("r", "lora_alpha"):
        if not isinstance(config.get(field), int | float):
            raise InputError(f"{path}: field {field!r} is missing or not a number")
    for option, why in _UNMERGEABLE_OPTIONS.items():
        if config.get(option):
            raise InputError(f"{path}: {option} is set; {why}")


# Which parameter the `ParamWrapper` at a module path adapts, given the config's target_parameters (None: the
# path is an ordinary module); only the base model's classes can say (see inputs/targets.py).
ParameterResolver = Callable[[str, list[str]], ParameterTarget | None]


def read_peft_adapter(folder: Path, parameters: ParameterResolver | None = None) -> Adapter:
    """Read a PEFT LoRA folder's config and tensor headers into per-module LoRA terms. An adapter with
    `target_parameters` needs `parameters` to tell its `ParamWrapper`s from ordinary modules; without it, its
    LoRA tensors are returned unresolved."""
    config_path = folder / "adapter_config.json"
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder")
    config = read_json(config_path)
    if not isinstance(config, dict):
        raise InputError(f"{config_path}: expected a JSON object")
    check_config(config_path, config)
    parts: dict[str, dict[str, TensorRef]] = {}
    replacements: dict[str, TensorRef] = {}
    saved_base: set[str] = set()
    token_rows: dict[str, tuple[TensorRef, tuple[int, ...]]] = {}
    for key, ref in _adapter_weights(folder).items():
        if not key.startswith(PREFIX):
            raise InputError(f"{ref.path}: tensor {key!r} does not start with {PREFIX!r} (not a PEFT LoRA adapter?)")
        name = key[len(PREFIX):]
        suffix = next((s for s in _LORA_SUFFIXES if name.endswith(s)), None)
        if suffix is not None:
            parts.setdefault(name[: -len(suffix)], {})[_LORA_SUFFIXES[suffix]] = ref
        elif name.endswith(_TOKENS_SUFFIX):
            module = name.removesuffix(_TOKENS_SUFFIX)
            token_rows[module] = (ref, _token_indices(config_path, config, module, ref))
        elif ".lora_" in name or "trainable_tokens" in name:
            raise InputError(f"{ref.path}: tensor {key!r} is of a kind lorastream does not merge")
        else:
            # modules_to_save, trained biases, or a saved base embedding: replacements of base tensors.
            replacements[name.replace(".base_layer.", ".")] = ref
            if ".base_layer." in name:
                saved_base.add(name.replace(".base_layer.", "."))
    targets = list(config.get("target_parameters") or [])
    if targets and parameters is None:
        return Adapter(str(folder), {}, replacements, config, parts, frozenset(saved_base), token_rows)
    modules: dict[str, LoraModule] = {}
    for module, found in parts.items():
        parameter = parameters(module, targets) if targets and parameters is not None else None
        lora = _lora_module(config_path, config, module, found, parameter)
        modules[lora.module] = lora
    if not modules and not replacements and not token_rows:
        raise InputError(f"{folder}: the adapter holds no LoRA tensors")
    return Adapter(str(folder), modules, replacements, config, {}, frozenset(saved_base), token_rows)


_TOKENS_SUFFIX = ".token_adapter.trainable_tokens_delta"


def _token_indices(config_path: Path, config: dict[str, Any], module: str, values: TensorRef) -> tuple[int, ...]:
    """The vocabulary rows a PEFT TrainableTokens layer replaces: `trainable_token_indices` is a list (for the input
    embedding) or maps module names to lists, matched as PEFT matches module names."""
    indices = config.get("trainable_token_indices")
    if isinstance(indices, dict):
        indices = next((v for k, v in indices.items() if module == k or module.endswith(f".{k}")), None)
    if not isinstance(indices, list) or not all(isinstance(i, int) for i in indices):
        raise InputError(f"{config_path}: trainable_token_indices gives no token list for {module!r}")
    if len(values.shape) != 2 or values.shape[0] != len(indices):
        raise InputError(f"{values.path}: {module!r}: trainable_tokens_delta of shape {list(values.shape)} for "
                         f"{len(indices)} token indices")
    return tuple(indices)


def _lora_module(config_path: Path, config: dict[str, Any], module: str, found: dict[str, TensorRef],
                 parameter: ParameterTarget | None = None) -> LoraModule:
    """One module's LoRA terms; a `ParamWrapper`'s (`parameter` set) hold every expert's factors, and its rank and
    alpha patterns match the parameter's name, as PEFT matches them."""
    embedding = "embedding_a" in found or "embedding_b" in found
    a = found.get("embedding_a" if embedding else "a")
    b = found.get("embedding_b" if embedding else "b")
    if a is None or b is None:
        raise InputError(f"{config_path.parent}: module {module!r} has only one of its LoRA A/B tensors")
    if len(a.shape) != 2 or len(b.shape) != 2:
        raise InputError(f"{a.path}: module {module!r}: LoRA tensors of shape {list(a.shape)} and {list(b.shape)}; "
                         "only Linear, Conv1D and Embedding layers are supported (no convolutions)")
    key = module if parameter is None else parameter.name
    rank = pattern_value(config.get("rank_pattern") or {}, key, config["r"])
    alpha = pattern_value(config.get("alpha_pattern") or {}, key, config["lora_alpha"])
    experts = parameter.shape[0] if parameter is not None and len(parameter.shape) == 3 else 1
    if a.shape[0] != rank * experts or b.shape[1] != rank * experts:
        raise InputError(f"{a.path}: module {module!r}: LoRA A {list(a.shape)} and B {list(b.shape)} do not have "
                         f"the rank {rank} that adapter_config.json gives it"
                         + (f" ({experts} experts)" if experts > 1 else ""))
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    magnitude = found.get("magnitude")
    if magnitude is not None and not config.get("use_dora"):
        raise InputError(f"{magnitude.path}: module {module!r} has a DoRA magnitude but use_dora is not set")
    if config.get("use_dora") and magnitude is None:
        raise InputError(f"{a.path}: use_dora is set but module {module!r} has no lora_magnitude_vector")
    if embedding and magnitude is not None:
        raise InputError(f"{a.path}: module {module!r}: DoRA on embeddings is not supported yet")
    if parameter is not None:
        if embedding or magnitude is not None or "bias" in found:
            raise InputError(f"{a.path}: parameter {parameter.name!r}: PEFT's ParamWrapper has no embedding, DoRA "
                             "or bias form")
        return LoraModule(parameter.name, a, b, float(scale), parameter=parameter)
    return LoraModule(module, a, b, float(scale), embedding, magnitude, found.get("bias"))
