"""The adapter alone, out of a whole checkpoint (`extract`) or a live model (`save_lora`).

A LitGPT `GPT` with LoRA layers and a PEFT `PeftModel` hold their adapter next to the (possibly quantized)
base weights. Adapter tensors are recognised by name only (LitGPT: `*lora_A`/`*lora_B`, its `lora_filter`;
PEFT: `<module>.lora_A.<adapter>.weight`, DoRA magnitudes, `modules_to_save`), so a checkpoint's base
weights are never read and a live model's are never touched, moved or dequantized. Each adapter tensor is
moved to the CPU and written on its own by the streaming writers; the output folder appears only complete.
What the tensors cannot tell (LoRA alpha, the base checkpoint) comes from a config beside the checkpoint, the
live model's config or the caller, and the result is read back with lorastream's own adapter readers before
it is published, so a config that disagrees with the tensors is refused.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from .adapters.litgpt import QKV_MODULES, read_litgpt_adapter
from .adapters.peft import PREFIX, check_config, read_peft_adapter
from .dtypes import LITGPT_PRECISIONS
from .errors import InputError
from .formats.hf import read_json
from .formats.litgpt import (
    CONFIG_FILE,
    HYPERPARAMETERS_FILE,
    LORA_FILE,
    Attention,
    find_companions,
    read_lora_run,
    read_yaml,
)
from .formats.safetensors import ShardWriter, TensorSpec, read_header
from .formats.torchzip import read_state_dict
from .formats.torchzip_writer import TorchZipWriter
from .io.staging import job_id, promote, staging_for
from .litgpt import family_of, hf_targets
from .memory import current_rss, format_size
from .outputs.base import check_destination
from .version import __version__

logger = logging.getLogger("lorastream")

FORMATS = ("litgpt", "peft")
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
# A PEFT adapter tensor inside a whole PeftModel: module, kind, adapter name, the rest (`.weight`, `.bias`).
_PEFT_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B|"
                       r"lora_magnitude_vector|modules_to_save)\.(?P<adapter>[^.]+)(?P<rest>\..+)?$")
# PEFT saves the base weight of these layers with the adapter when one of them is a LoRA target.
_EMBEDDING_LAYERS = ("embed_tokens", "lm_head")


@dataclass(frozen=True)
class AdapterTensor:
    """One tensor of the adapter: its name in the adapter file, and how to get its values (read on demand)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]


@dataclass(frozen=True)
class AdapterResult:
    """What `extract` or `save_lora` wrote, and the memory it took beyond what the process held before."""

    out_dir: Path
    format: str
    files: list[str]
    tensors: int
    bytes_written: int
    extra_memory: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {"out_dir": str(self.out_dir), "format": self.format, "files": self.files, "tensors": self.tensors,
                "bytes_written": self.bytes_written, "extra_memory": self.extra_memory,
                "seconds": round(self.seconds, 3)}


def adapter_family(names: Iterable[str]) -> str | None:
    """"peft" for a PeftModel's names, "litgpt" for a LitGPT LoRA GPT's, None when no name is a LoRA tensor."""
    found = None
    for name in names:
        if name.startswith(PREFIX) and _PEFT_KEY.match(name):
            return "peft"
        if name.endswith((".lora_A", ".lora_B")):
            found = "litgpt"
    return found


def select_litgpt(names: Iterable[str]) -> dict[str, str]:
    """The names LitGPT's `lora_filter` keeps (it saves them under the same names)."""
    return {name: name for name in names if "lora_" in name}


def select_peft(names: Iterable[str], adapter_name: str, source: str) -> dict[str, str]:
    """Whole-model name -> adapter file name, as PEFT's `get_peft_model_state_dict` names them.

    The adapter name goes; DoRA's `lora_magnitude_vector.<name>.weight` loses `.weight`;
    `<m>.modules_to_save.<name>.weight` becomes `<m>.weight`; and when an embedding layer (`embed_tokens`,
    `lm_head`) is a LoRA target, its `base_layer` weights are saved too, as PEFT does.
    """
    names = list(names)
    chosen: dict[str, str] = {}
    adapters: set[str] = set()
    embeddings: set[str] = set()
    for name in names:
        match = _PEFT_KEY.match(name)
        if "trainable_tokens" in name:
            raise InputError(f"{source}: tensor {name!r} holds trainable token deltas, which are not supported yet")
        if match is None:
            continue
        adapters.add(match["adapter"])
        if match["adapter"] != adapter_name:
            continue
        module, kind, rest = match["module"], match["kind"], match["rest"] or ""
        if kind == "modules_to_save":
            chosen[name] = module + rest
            continue
        chosen[name] = f"{module}.{kind}" if kind == "lora_magnitude_vector" else f"{module}.{kind}{rest}"
        if module.rpartition(".")[2] in _EMBEDDING_LAYERS:
            embeddings.add(module)
    if adapters and adapter_name not in adapters:
        raise InputError(f"{source}: no adapter named {adapter_name!r}; it holds {', '.join(sorted(adapters))} "
                         "(choose one with --adapter-name)")
    for name in names:
        module, found, _ = name.partition(".base_layer.")
        if found and module in embeddings:
            chosen[name] = name
    return chosen


def _peft_modules(tensors: list[AdapterTensor]) -> tuple[dict[str, int], list[str], bool, bool]:
    """From the adapter's names and shapes: rank by LoRA module, modules_to_save, DoRA, lora_bias."""
    ranks: dict[str, int] = {}
    replaced: list[str] = []
    for t in tensors:
        name = t.name.removeprefix(PREFIX)
        for suffix in (".lora_A.weight", ".lora_embedding_A"):
            if name.endswith(suffix):
                ranks[name.removesuffix(suffix)] = t.shape[0]
        module = name.rpartition(".")[0]
        if ".lora_" not in name and ".base_layer." not in name and module not in replaced:
            replaced.append(module)
    dora = any(t.name.endswith(".lora_magnitude_vector") for t in tensors)
    bias = any(t.name.endswith(".lora_B.bias") for t in tensors)
    return ranks, replaced, dora, bias


def peft_config(tensors: list[AdapterTensor], given: dict[str, Any] | None, lora_alpha: float | None,
                base: str | None, source: str) -> dict[str, Any]:
    """The adapter_config.json: `given` (a config beside the checkpoint or the live model's) with `lora_alpha`
    and `base` overriding, or else one built from the tensors: r (the commonest rank; others in rank_pattern),
    the exact modules targeted, modules_to_save, use_dora, lora_bias."""
    if given is None:
        ranks, replaced, dora, bias = _peft_modules(tensors)
        if not ranks:
            raise InputError(f"{source}: no LoRA A tensors among the adapter's; nothing to build a config from")
        r = Counter(ranks.values()).most_common(1)[0][0]
        given = {"peft_type": "LORA", "r": r, "rank_pattern": {m: k for m, k in ranks.items() if k != r},
                 "alpha_pattern": {}, "target_modules": sorted(ranks), "modules_to_save": replaced or None,
                 "use_dora": dora, "lora_bias": bias, "use_rslora": False, "fan_in_fan_out": False, "bias": "none",
                 "lora_dropout": 0.0, "init_lora_weights": True, "inference_mode": True,
                 "base_model_name_or_path": None}
    config = dict(given)
    if lora_alpha is not None:
        config["lora_alpha"] = lora_alpha
    if base is not None:
        config["base_model_name_or_path"] = base
    if "lora_alpha" not in config:
        raise InputError(f"{source}: lora_alpha cannot be read from the tensors and there is no {PEFT_CONFIG_FILE} "
                         "beside it; pass --lora-alpha (or --config adapter_config.json)")
    check_config(Path(source), config)
    if config.get("bias", "none") != "none":
        raise InputError(f"{source}: bias={config['bias']!r} (trained base biases) is not supported yet; "
                         "only bias='none'")
    return config


def _qkv_parts(a_rows: int, b_rows: int, attention: Attention, rank: int | None) -> list[tuple[str, ...]]:
    """The subsets of q, k, v whose LoRA shapes would be A [r·parts, in], B [Σ part sizes, r]."""
    sizes = {"q": attention.q_size, "k": attention.kv_size, "v": attention.kv_size}
    fits = []
    for n in (1, 2, 3):
        for parts in itertools.combinations("qkv", n):
            if sum(sizes[p] for p in parts) == b_rows and a_rows % n == 0 and rank in (None, a_rows // n):
                fits.append(parts)
    return fits


def litgpt_hyperparameters(tensors: list[AdapterTensor], given: dict[str, Any], model_config: dict[str, Any],
                           lora_alpha: float | None, base: str | None, source: str, for_run: bool) -> dict[str, Any]:
    """hyperparameters.yaml as `litgpt finetune lora` writes it, for `litgpt merge_lora`: `given` (a run's file
    or a live model's config) completed from the tensors. Which layers carry LoRA is read from the tensors
    (projection, mlp, head); rank and which of q, k, v from the shapes when `given` does not say. A run
    folder (`for_run`) also needs the base checkpoint's folder."""
    hparams = dict(given)
    modules = {t.name.rpartition(".")[0]: t for t in tensors if t.name.endswith(".lora_A")}
    b_rows = {t.name.rpartition(".")[0]: t.shape[0] for t in tensors if t.name.endswith(".lora_B")}
    qkv = {m: t for m, t in modules.items() if m.endswith(QKV_MODULES)}
    others = [t.shape[0] for m, t in modules.items() if m not in qkv]
    rank = hparams.get("lora_r") or (Counter(others).most_common(1)[0][0] if others else None)
    flags = ("lora_query", "lora_key", "lora_value")
    if qkv and not all(f in hparams for f in flags):
        attention = Attention.from_config(model_config, Path(source))
        module, a = next(iter(qkv.items()))
        fits = _qkv_parts(a.shape[0], b_rows.get(module, -1), attention, rank)
        if len(fits) != 1:
            raise InputError(f"{source}: cannot tell which of q, k, v the LoRA on {module} covers (lora_A "
                             f"{list(a.shape)}, lora_B rows {b_rows.get(module)}); pass --config "
                             "hyperparameters.yaml with lora_r, lora_query, lora_key, lora_value")
        hparams.update({f: p in fits[0] for f, p in zip(flags, "qkv", strict=True)})
        rank = rank or a.shape[0] // len(fits[0])
    for flag in flags:
        hparams.setdefault(flag, False)
    enabled = sum(bool(hparams[f]) for f in flags)
    if rank is None and qkv and enabled:
        rank = next(iter(qkv.values())).shape[0] // enabled
    hparams.update(lora_r=rank, lora_projection=any(m.endswith(".attn.proj") for m in modules),
                   lora_mlp=any(".mlp." in m for m in modules), lora_head="lm_head" in modules)
    if lora_alpha is not None:
        hparams["lora_alpha"] = lora_alpha
    if base is not None:
        hparams["checkpoint_dir"] = base
    for field, how in (("lora_alpha", "--lora-alpha"), ("checkpoint_dir", "--base or base= (the LitGPT checkpoint "
                                                                            "folder it was trained from)")):
        if hparams.get(field) is None and (for_run or field != "checkpoint_dir"):
            raise InputError(f"{source}: {field} cannot be read from the tensors and no {HYPERPARAMETERS_FILE} "
                             f"gives it; pass {how} (or --config hyperparameters.yaml)")
    if hparams.get("precision") is None:
        hparams["precision"] = LITGPT_PRECISIONS.get(tensors[0].dtype)
    return hparams


def _write_tensors(folder: Path, fmt: str, tensors: list[AdapterTensor]) -> tuple[int, int]:
    """Write the adapter file, one tensor in CPU memory at a time; (bytes written, peak extra RSS)."""
    specs = [TensorSpec(t.name, t.dtype, t.shape) for t in tensors]
    writer: ShardWriter | TorchZipWriter
    if fmt == "peft":
        writer = ShardWriter(folder / PEFT_WEIGHTS_FILE, specs, {"format": "pt"})
    else:
        writer = TorchZipWriter(folder / LORA_FILE, specs, wrap="model")
    baseline = peak = current_rss()
    try:
        for t in tensors:
            value = t.load().detach().to("cpu").contiguous()
            if value.dtype != t.dtype or tuple(value.shape) != t.shape:
                raise InputError(f"tensor {t.name!r}: read {value.dtype} {list(value.shape)}, expected {t.dtype} "
                                 f"{list(t.shape)}")
            writer.write(value.reshape(-1).view(torch.uint8).numpy())
            peak = max(peak, current_rss())
            del value
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    return writer.size, peak - baseline


def _publish(out: Path, fmt: str, tensors: list[AdapterTensor], config: dict[str, Any], companions: list[Path],
             model_config: dict[str, Any] | None, job: str, overwrite: bool, source: str) -> AdapterResult:
    """Write the adapter and its config into a staging folder, read it back as lorastream would, publish it."""
    started = time.perf_counter()
    check_destination(out, overwrite)
    with staging_for(out, job, overwrite) as staging:
        size, extra = _write_tensors(staging.path, fmt, tensors)
        if fmt == "peft":
            (staging.path / PEFT_CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        else:
            (staging.path / HYPERPARAMETERS_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
            for path in companions:
                if path.name != CONFIG_FILE:
                    shutil.copy2(path, staging.path / path.name)
            (staging.path / CONFIG_FILE).write_text(yaml.safe_dump(model_config, sort_keys=False))
        try:
            if fmt == "peft":
                read_peft_adapter(staging.path)
            else:
                read_litgpt_adapter(read_lora_run(staging.path), None)
        except InputError as exc:
            raise InputError(f"{source}: the adapter does not agree with its config ({exc})") from None
        promote(staging, out)
    files = sorted(p.name for p in out.iterdir())
    result = AdapterResult(out, fmt, files, len(tensors), size, extra, time.perf_counter() - started)
    logger.info("wrote %s (%s adapter, %d tensors, %s) in %.1f s; extra memory %s", out, fmt, len(tensors),
                format_size(size), result.seconds, format_size(extra))
    return result


def _format(requested: str | None, family: str, source: str) -> str:
    fmt = requested or family
    if fmt not in FORMATS:
        raise InputError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if (family, fmt) == ("peft", "litgpt"):
        raise InputError(f"{source}: holds a PEFT adapter; converting it to LitGPT form is not supported yet")
    return fmt


def _rows(t: AdapterTensor, name: str, start: int, stop: int) -> AdapterTensor:
    return AdapterTensor(name, t.dtype, (stop - start, *t.shape[1:]), lambda: t.load()[start:stop])


def litgpt_as_peft(tensors: list[AdapterTensor], hparams: dict[str, Any], model_config: dict[str, Any],
                   source: str) -> list[AdapterTensor]:
    """A LitGPT LoRA as PEFT's on the Hugging Face model litgpt's `convert_lit_checkpoint` makes (Llama, Mistral,
    Qwen2: q, k, v split). The same update, B @ A · alpha/r, on the same weights: each module keeps its A and B
    under the Hugging Face name; the fused qkv's part j (q, k or v) takes rows [j·r, (j+1)·r) of A and its own
    contiguous rows of B, which are the rows of that projection in order, in either qkv layout."""
    family = family_of(model_config, source)
    attention = Attention.from_config(model_config, Path(source))
    rank = int(hparams["lora_r"])
    pairs = {t.name: t for t in tensors}
    converted: list[AdapterTensor] = []
    for name, a in pairs.items():
        module = name.removesuffix(".lora_A")
        if module == name:
            continue
        b = pairs[f"{module}.lora_B"]
        targets = hf_targets(f"{module}.weight", family, attention)
        if not module.endswith(QKV_MODULES):
            hf = PREFIX + targets[0][0].removesuffix(".weight")
            if any(hf.endswith(f".{stacked}") for stacked in family.stacked):
                raise InputError(f"{source}: LoRA on {module} covers only some rows of Hugging Face's stacked "
                                 f"{hf.rpartition('.')[2]}; converting it is not supported")
            converted += [dataclasses.replace(a, name=f"{hf}.lora_A.weight"),
                          dataclasses.replace(b, name=f"{hf}.lora_B.weight")]
            continue
        if family.fused_qkv:
            raise InputError(f"{source}: LoRA on {module} would be one rank-{rank}·parts LoRA on Hugging Face's fused "
                             f"{family.fused_qkv}; converting it is not supported")
        b_row = 0
        enabled = [part for part, flag in zip("qkv", ("lora_query", "lora_key", "lora_value"), strict=True)
                   if hparams.get(flag)]
        for j, part in enumerate(enabled):
            target, ranges = targets["qkv".index(part)]
            size = sum(stop - start for start, stop in ranges or [])
            hf = PREFIX + target.removesuffix(".weight")
            converted += [_rows(a, f"{hf}.lora_A.weight", j * rank, (j + 1) * rank),
                          _rows(b, f"{hf}.lora_B.weight", b_row, b_row + size)]
            b_row += size
    return converted


def _publish_litgpt(tensors: list[AdapterTensor], given: dict[str, Any], model_config: dict[str, Any],
                    alpha: float | None, base: str | None, fmt: str, companions: list[Path], out: Path, job: str,
                    overwrite: bool, source: str) -> AdapterResult:
    """A LitGPT adapter as a run folder, or converted to a PEFT adapter folder for the Hugging Face model."""
    hparams = litgpt_hyperparameters(tensors, given, model_config, alpha, base, source, for_run=fmt == "litgpt")
    if fmt == "litgpt":
        return _publish(out, fmt, tensors, hparams, companions, model_config, job, overwrite, source)
    converted = litgpt_as_peft(tensors, hparams, model_config, source)
    settings = peft_config(converted, None, hparams["lora_alpha"], base, source)
    return _publish(out, fmt, converted, settings, [], None, job, overwrite, source)


def _read_config(path: Path) -> dict[str, Any]:
    data = read_json(path) if path.suffix == ".json" else read_yaml(path)
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping at the top level")
    return data


def _number(value: float | None) -> float | int | None:
    """An alpha as LitGPT and PEFT write it: an int when it is whole."""
    return int(value) if value is not None and float(value).is_integer() else value


def extract(checkpoint: str | Path, out: str | Path, *, format: str | None = None, lora_alpha: float | None = None,
            config: str | Path | None = None, base: str | Path | None = None, adapter_name: str = "default",
            overwrite: bool = False) -> AdapterResult:
    """Write the adapter held in a whole checkpoint (a LitGPT LoRA `GPT`'s or a `PeftModel`'s state dict, torch
    zip or safetensors) as a LitGPT run folder or a PEFT adapter folder; only the adapter tensors are read.

    Settings the tensors cannot give come from `config` (adapter_config.json or hyperparameters.yaml; by
    default the one beside the checkpoint), `lora_alpha` and `base` (PEFT's base_model_name_or_path,
    LitGPT's checkpoint_dir, also where model_config.yaml and tokenizer files are looked for).
    """
    path = Path(checkpoint)
    source = str(path)
    if not path.is_file():
        raise InputError(f"{path}: not a file (expected a whole checkpoint: .pth, .pt, .bin or .safetensors)")
    refs = read_header(path).tensors if path.suffix == ".safetensors" else read_state_dict(path)
    family = adapter_family(refs)
    if family is None:
        raise InputError(f"{path}: no LoRA tensors (no name ends in lora_A/lora_B, nor has PEFT's "
                         "base_model.model.<module>.lora_A.<adapter>); nothing to extract")
    fmt = _format(format, family, source)
    chosen = select_peft(refs, adapter_name, source) if family == "peft" else select_litgpt(refs)
    tensors = [AdapterTensor(key, refs[name].dtype, refs[name].shape, refs[name].read) for name, key in chosen.items()]
    config_path = Path(config) if config is not None else path.parent / (
        PEFT_CONFIG_FILE if family == "peft" else HYPERPARAMETERS_FILE)
    if config is not None and not config_path.is_file():
        raise InputError(f"{config_path}: file not found")
    given = _read_config(config_path) if config_path.is_file() else None
    options = {"format": fmt, "lora_alpha": lora_alpha, "base": str(base), "adapter_name": adapter_name}
    job = job_id([path, *([config_path] if given is not None else [])], options, __version__)
    alpha = _number(lora_alpha)
    if family == "peft":
        settings = peft_config(tensors, given, alpha, None if base is None else str(base), source)
        return _publish(Path(out).absolute(), fmt, tensors, settings, [], None, job, overwrite, source)
    folders = [path.parent, *([Path(base)] if base is not None else [])]
    recorded = (given or {}).get("checkpoint_dir")
    if base is None and isinstance(recorded, str) and Path(recorded).is_dir():
        folders.append(Path(recorded))
    companions = list(find_companions(*folders))
    model_configs = [p for p in companions if p.name == CONFIG_FILE]
    if not model_configs:
        raise InputError(f"{path}: LitGPT needs {CONFIG_FILE} (the architecture) and none is beside the checkpoint "
                         "or in its base; pass --base (the LitGPT checkpoint folder it was trained from)")
    return _publish_litgpt(tensors, given or {}, read_yaml(model_configs[0]), alpha,
                           None if base is None else str(base), fmt, companions, Path(out).absolute(), job, overwrite,
                           source)


def _live_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers by name, without touching them (no state_dict hooks, no dequantization)."""
    return dict(itertools.chain(model.named_parameters(remove_duplicate=False),
                                model.named_buffers(remove_duplicate=False)))


def _json_ready(value: Any) -> Any:
    """A PEFT config value as `PeftConfig.save_pretrained` writes it (sets become lists)."""
    if isinstance(value, set | frozenset):
        return sorted(value)
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    return value


def save_lora(model: torch.nn.Module, out: str | Path, *, format: str | None = None, adapter_name: str = "default",
              base: str | Path | None = None, overwrite: bool = False) -> AdapterResult:
    """Save only the adapter of a live model: a PEFT `PeftModel` (as `save_pretrained` would) or a LitGPT LoRA
    `GPT` (as `litgpt finetune lora` does: lit_model.pth.lora, hyperparameters.yaml, model_config.yaml).

    The base weights are never touched, so a 4-bit base stays as it is and memory grows by one adapter tensor
    at a time; `lorastream merge` then merges in another process, in bounded memory. `base` is the base model's
    name or folder (PEFT: base_model_name_or_path; LitGPT: checkpoint_dir, needed by `litgpt merge_lora`, and
    where tokenizer files are copied from). Call it on one process only in distributed training.
    """
    source = type(model).__name__
    live = _live_tensors(model)
    peft_configs = getattr(model, "peft_config", None)
    family = "peft" if isinstance(peft_configs, dict) else adapter_family(live)
    if family is None:
        raise InputError(f"{source}: the model has no LoRA parameters (neither a PeftModel nor a LitGPT LoRA GPT)")
    fmt = _format(format, family, source)
    chosen = select_peft(live, adapter_name, source) if family == "peft" else select_litgpt(live)
    if not chosen:
        raise InputError(f"{source}: the model has no LoRA parameters for adapter {adapter_name!r}")
    tensors = [AdapterTensor(key, live[name].dtype, tuple(live[name].shape), live[name].detach)
               for name, key in chosen.items()]
    job = job_id([], {"save_lora": fmt, "out": str(out)}, __version__)
    if family == "peft":
        assert isinstance(peft_configs, dict)
        if adapter_name not in peft_configs:
            raise InputError(f"{source}: no adapter named {adapter_name!r}; it has {', '.join(peft_configs)}")
        given = {**_json_ready(peft_configs[adapter_name].to_dict()), "inference_mode": True}
        settings = peft_config(tensors, given, None, None if base is None else str(base), source)
        return _publish(Path(out).absolute(), fmt, tensors, settings, [], None, job, overwrite, source)
    config = getattr(model, "config", None)
    if not dataclasses.is_dataclass(config):
        raise InputError(f"{source}: a LitGPT model keeps its architecture in a dataclass `config`; found "
                         f"{type(config).__name__}")
    fields = dataclasses.asdict(config)  # type: ignore[arg-type]
    model_config = {k: v for k, v in fields.items() if not k.startswith("lora_")}
    given = {k: v for k, v in fields.items() if k.startswith("lora_")}
    companions = list(find_companions(Path(base))) if base is not None else []
    return _publish_litgpt(tensors, {"checkpoint_dir": None, "precision": None, "quantize": None, **given},
                           model_config, None, None if base is None else str(base), fmt, companions,
                           Path(out).absolute(), job, overwrite, source)
