"""LitGPT folders: a checkpoint (`lit_model.pth` + `model_config.yaml`) and a LoRA run from `litgpt finetune lora`.

Both are read from headers only: `lit_model.pth` and `lit_model.pth.lora` are torch zip pickles replayed by
the restricted reader, so no pickled code runs and no tensor is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..codecs.plain import TensorRef
from ..errors import InputError
from .hf import HFModel
from .torchzip import read_state_dict

MODEL_FILE = "lit_model.pth"
LORA_FILE = "lit_model.pth.lora"
CONFIG_FILE = "model_config.yaml"
HYPERPARAMETERS_FILE = "hyperparameters.yaml"
# The files litgpt's `copy_config_files` carries from a checkpoint into a run folder.
COMPANION_FILES = ("config.json", "generation_config.json", CONFIG_FILE, "tokenizer.json", "tokenizer.model",
                   "tokenizer_config.json")


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise InputError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping at the top level")
    return data


@dataclass(frozen=True)
class Attention:
    """Sizes of the fused qkv weight, as LitGPT's `Config` derives them (grouped-query attention)."""

    n_head: int
    n_query_groups: int
    head_size: int

    @classmethod
    def from_config(cls, config: dict[str, Any], path: Path) -> Attention:
        try:
            n_head = int(config["n_head"])
            groups = int(config.get("n_query_groups") or n_head)
            head_size = int(config.get("head_size") or int(config["n_embd"]) // n_head)
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{path}: n_head, n_embd (or head_size) and n_query_groups must be integers "
                             f"({exc!r})") from None
        if n_head <= 0 or groups <= 0 or head_size <= 0 or n_head % groups:
            raise InputError(f"{path}: n_head {n_head} is not a positive multiple of n_query_groups {groups}")
        return cls(n_head, groups, head_size)

    @property
    def q_size(self) -> int:
        return self.n_head * self.head_size

    @property
    def kv_size(self) -> int:
        return self.n_query_groups * self.head_size

    def groups(self, legacy: bool) -> list[dict[str, tuple[int, int]]]:
        """Per query group, the rows its q heads, its k head and its v head occupy in the fused weight.

        Current layout (`attn.qkv`, LitGPT >= 0.5.5): [Q; K; V]. Legacy (`attn.attn`, <= 0.5.4): interleaved
        per query group as [Q * q_per_kv, K, V] repeated.
        """
        q_rows, hs = self.n_head // self.n_query_groups * self.head_size, self.head_size
        found = []
        for g in range(self.n_query_groups):
            if legacy:
                start = g * (q_rows + 2 * hs)
                q, k, v = start, start + q_rows, start + q_rows + hs
            else:
                q, k, v = g * q_rows, self.q_size + g * hs, self.q_size + self.kv_size + g * hs
            found.append({"q": (q, q + q_rows), "k": (k, k + hs), "v": (v, v + hs)})
        return found

    def part_rows(self, part: str, legacy: bool) -> list[tuple[int, int]]:
        """The rows of q, k or v in the fused weight, in the order LoRA's B stores them, adjacent ones joined."""
        return join_ranges([group[part] for group in self.groups(legacy)])


def join_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Row ranges with each range that starts where the previous one ends joined to it."""
    joined: list[tuple[int, int]] = []
    for start, stop in ranges:
        if joined and joined[-1][1] == start:
            joined[-1] = (joined[-1][0], stop)
        else:
            joined.append((start, stop))
    return joined


def find_companions(*folders: Path) -> tuple[Path, ...]:
    """Config and tokenizer files, each from the first folder that has it."""
    found: dict[str, Path] = {}
    for folder in folders:
        for name in COMPANION_FILES:
            if name not in found and (folder / name).is_file():
                found[name] = folder / name
    return tuple(found[name] for name in sorted(found))


def open_litgpt_model(folder: Path) -> HFModel:
    """A LitGPT checkpoint folder as the planner sees a base model; only headers are read."""
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder")
    path = folder / MODEL_FILE
    if not path.is_file():
        raise InputError(f"{folder}: no {MODEL_FILE} (not a LitGPT checkpoint folder?)")
    config = read_yaml(folder / CONFIG_FILE)
    tensors = read_state_dict(path)
    return HFModel(folder, config, tensors, dict(tensors), "litgpt", (path,), find_companions(folder))


@dataclass(frozen=True)
class LoraRun:
    """A `litgpt finetune lora` output folder (`final/`, `step-XXXXXX/`): LoRA tensors and how they were trained."""

    path: Path
    hyperparameters: dict[str, Any]
    config: dict[str, Any]
    tensors: dict[str, TensorRef]

    @property
    def base_dir(self) -> Path:
        """The base checkpoint the run was trained on, as recorded in hyperparameters.yaml."""
        recorded = self.hyperparameters.get("checkpoint_dir")
        if not isinstance(recorded, str) or not recorded:
            raise InputError(f"{self.path / HYPERPARAMETERS_FILE}: no checkpoint_dir recorded; pass --base")
        path = Path(recorded)
        # litgpt's `extend_checkpoint_dir`: a relative name may live under ./checkpoints/
        if not path.is_dir() and not path.is_absolute() and path.parts[0] != "checkpoints":
            path = Path("checkpoints") / path if (Path("checkpoints") / path).exists() else path
        if not path.is_dir():
            raise InputError(f"{self.path / HYPERPARAMETERS_FILE}: the base checkpoint it records, {recorded}, is "
                             "not a folder here; pass --base")
        return path

    def companions(self, base: HFModel) -> tuple[Path, ...]:
        """The files to ship with a merged checkpoint: the run's copies first, then the base's."""
        return find_companions(self.path, base.path)


def is_lora_run(folder: Path) -> bool:
    return (folder / LORA_FILE).is_file()


def read_lora_run(folder: Path) -> LoraRun:
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder")
    if not is_lora_run(folder):
        raise InputError(f"{folder}: no {LORA_FILE} (not a LitGPT LoRA run folder?)")
    hyperparameters = read_yaml(folder / HYPERPARAMETERS_FILE)
    for field in ("lora_r", "lora_alpha"):
        value = hyperparameters.get(field)
        if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
            raise InputError(f"{folder / HYPERPARAMETERS_FILE}: {field} is {value!r}, expected a positive number")
    return LoraRun(folder, hyperparameters, read_yaml(folder / CONFIG_FILE), read_state_dict(folder / LORA_FILE))
