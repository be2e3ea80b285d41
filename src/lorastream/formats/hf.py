"""Hugging Face model folders: config.json, weight files (sharded or not), and the files that travel with them."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..codecs import Source, group_sources
from ..codecs.plain import TensorRef
from ..dtypes import config_dtype
from ..errors import InputError
from .safetensors import read_header
from .torchzip import read_state_dict

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt", ".index.json")


@dataclass(frozen=True)
class HFModel:
    """A base model folder: its config, its tensors (in storage order) and the other files to carry over."""

    path: Path
    config: dict[str, Any]
    tensors: dict[str, TensorRef]
    sources: dict[str, Source]
    weight_format: str
    weight_files: tuple[Path, ...]
    companion_files: tuple[Path, ...]

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", ""))


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from exc


def _own_storage(folder: Path) -> list[Path]:
    """Where a model folder's files may live: in it, and for a Hugging Face cache snapshot
    (`models--org--name/snapshots/<commit>/`, whose files link to `../../blobs/`) in its repo's blobs."""
    root = folder.resolve()
    if isinstance(root, Path) and root.parent.name == "snapshots" and (root.parent.parent / "blobs").is_dir():
        return [root, root.parent.parent / "blobs"]
    return [root]


def _index_files(folder: Path, index_path: Path) -> list[Path]:
    """The weight files an index names, each confined to `folder`."""
    index = read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise InputError(f"{index_path}: expected a non-empty 'weight_map' object")
    files: list[Path] = []
    roots = _own_storage(folder)
    for name, filename in weight_map.items():
        if not isinstance(filename, str):
            raise InputError(f"{index_path}: tensor {name!r} maps to {filename!r}, expected a file name")
        path = (folder / filename).resolve()
        if not any(path.is_relative_to(root) for root in roots):
            raise InputError(f"{index_path}: tensor {name!r} points outside the model folder ({filename!r})")
        if not path.is_file():
            raise InputError(f"{index_path}: tensor {name!r} is in {filename!r}, which does not exist")
        if path not in files:
            files.append(path)
    return files


def _locate_weights(folder: Path) -> tuple[str, list[Path]]:
    for index_name, single, fmt in ((SAFETENSORS_INDEX, SAFETENSORS_SINGLE, "safetensors"),
                                    (BIN_INDEX, BIN_SINGLE, "pytorch")):
        if (folder / index_name).is_file():
            return fmt, _index_files(folder, folder / index_name)
        if (folder / single).is_file():
            return fmt, [folder / single]
    raise InputError(f"{folder}: no model weights found (expected {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX}, "
                     f"{BIN_SINGLE} or {BIN_INDEX})")


def open_hf_model(folder: Path) -> HFModel:
    """Read the headers of a Hugging Face model folder; no weight bytes are loaded."""
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder")
    hf_weights = (SAFETENSORS_SINGLE, SAFETENSORS_INDEX, BIN_SINGLE, BIN_INDEX)
    if (folder / "lit_model.pth").is_file() and not any((folder / name).is_file() for name in hf_weights):
        raise InputError(f"{folder}: a LitGPT checkpoint (lit_model.pth), not a Hugging Face folder; merge a LitGPT "
                         "run as `lorastream merge RUN` (its hyperparameters.yaml names this base)")
    config = read_json(folder / "config.json")
    if not isinstance(config, dict):
        raise InputError(f"{folder / 'config.json'}: expected a JSON object")
    fmt, files = _locate_weights(folder)
    tensors: dict[str, TensorRef] = {}
    for path in files:
        refs = read_header(path).tensors if fmt == "safetensors" else read_state_dict(path)
        for name, ref in refs.items():
            if name in tensors:
                raise InputError(f"{path}: tensor {name!r} is also stored in {tensors[name].path.name}")
            tensors[name] = ref
    companions = tuple(sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                              and p.name != "config.json" and not p.name.endswith(WEIGHT_SUFFIXES)))
    dense = config_dtype(config, torch.float16)
    sources = group_sources(tensors, dense)
    check_config_matches(folder / "config.json", config, sources)
    return HFModel(folder, config, tensors, sources, fmt, tuple(files), companions)


_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")


def check_config_matches(path: Path, config: dict[str, Any], sources: dict[str, Source]) -> None:
    """Refuse a base whose config.json disagrees with its tensors (layer count, hidden size, vocabulary):
    transformers would fail or silently drop weights when loading the merged output."""
    layers = {int(m.group(1)) for name in sources if (m := _LAYER_INDEX.search(name))}
    declared = config.get("num_hidden_layers", config.get("n_layer"))
    if layers and isinstance(declared, int) and max(layers) + 1 != declared:
        raise InputError(f"{path}: num_hidden_layers is {declared}, the weights hold {max(layers) + 1} layers")
    embedding = next((s for name, s in sources.items() if name.endswith(_EMBEDDINGS) and len(s.shape) == 2), None)
    if embedding is None:
        return
    for field, axis in (("hidden_size", 1), ("n_embd", 1), ("vocab_size", 0)):
        value = config.get(field)
        if isinstance(value, int) and embedding.shape[axis] != value:
            raise InputError(f"{path}: {field} is {value}, tensor {embedding.name!r} has shape "
                             f"{list(embedding.shape)}")
