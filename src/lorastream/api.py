"""The Python API: `plan`, `merge` and `inspect`, the same verbs as the command line."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .adapters.lora import Adapter
from .adapters.peft import read_peft_adapter
from .codecs import Encoding
from .codecs.bnb4 import Bnb4Encoding
from .codecs.int8 import Int8Encoding
from .engine import Progress, ShardSink, write_shards
from .errors import InputError, ResourceError
from .formats.hf import HFModel, open_hf_model, read_json
from .formats.litgpt import MODEL_FILE, open_litgpt_model, read_lora_run
from .formats.safetensors import ShardWriter, read_header
from .formats.tensor_ref import TensorRef
from .formats.torchzip import read_state_dict
from .formats.torchzip_writer import TorchZipWriter
from .litgpt import FORMATS as LITGPT_FORMATS
from .litgpt import plan_litgpt
from .memory import current_rss, default_budget, parse_size, peak_rss
from .output import PROVENANCE_FILE, check_destination, write_companions
from .planner import Plan, Shard, describe_shortfall, make_plan
from .staging import job_id, promote, staging_for
from .verification import Comparator, TensorCheck, VerifyReport

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
PathLike = str | Path


@dataclass(frozen=True)
class MergeResult:
    """What a finished merge produced and what it cost."""

    out_dir: Path
    files: list[str]
    bytes_written: int
    seconds: float
    peak_rss: int
    budget: int

    def to_json(self) -> dict[str, Any]:
        return {"out_dir": str(self.out_dir), "files": self.files, "bytes_written": self.bytes_written,
                "seconds": round(self.seconds, 3), "peak_rss": self.peak_rss, "budget": self.budget}


def _adapters(adapters: PathLike | Sequence[PathLike], weights: Sequence[float] | None) -> list[tuple[Adapter, float]]:
    paths = [adapters] if isinstance(adapters, str | Path) else list(adapters)
    if not paths:
        raise InputError("no adapter given")
    weights = list(weights) if weights is not None else [1.0] * len(paths)
    if len(weights) != len(paths):
        raise InputError(f"--weights has {len(weights)} values for {len(paths)} adapters")
    return [(read_peft_adapter(Path(p)), float(w)) for p, w in zip(paths, weights, strict=True)]


def _encoding(quantize: str | None, double_quant: bool | None, dtype: torch.dtype | None,
              model: HFModel, option: str = "--quantize") -> Encoding | None:
    if quantize is None:
        return None
    if quantize == "int8" and option == "--quantize":
        return Int8Encoding()
    if quantize not in ("nf4", "fp4"):
        raise InputError(f"{option} {quantize!r}: expected nf4 or fp4" + (" or int8" if option == "--quantize" else ""))
    compute = dtype or DTYPES.get(model.config.get("dtype") or model.config.get("torch_dtype") or "", torch.bfloat16)
    return Bnb4Encoding(quantize, quantize == "nf4" if double_quant is None else double_quant, compute)


def plan(base: PathLike, adapters: PathLike | Sequence[PathLike], out: PathLike, *,
         weights: Sequence[float] | None = None, max_memory: str | int | None = None,
         dtype: str | None = None, max_shard_size: str | int = "5GB", quantize: str | None = None,
         double_quant: bool | None = None, trained_on: str | None = None) -> Plan:
    """Plan a merge from headers only: output layout, memory and disk needs. Nothing is written.

    `quantize` ("nf4", "fp4", "int8") writes linear weights in bitsandbytes' format; `trained_on` ("nf4",
    "fp4") merges into the base as QLoRA training saw it, `dequantize(quantize(W))`; `double_quant`
    (default: on for nf4) applies to both.
    """
    if dtype is not None and dtype not in DTYPES:
        raise InputError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    out_dir = Path(out).absolute()
    probe = next((p for p in (out_dir, *out_dir.parents) if p.exists()), Path("/"))
    model = open_hf_model(Path(base))
    chosen = DTYPES.get(dtype or "")
    return make_plan(model, _adapters(adapters, weights), out_dir,
                     budget=parse_size(max_memory) if max_memory is not None else default_budget(),
                     baseline=current_rss(), disk_free=shutil.disk_usage(probe).free,
                     max_shard_size=parse_size(max_shard_size), dtype=chosen,
                     quantize=_encoding(quantize, double_quant, chosen, model),
                     trained_on=_encoding(trained_on, double_quant, None, model, "--trained-on"))  # type: ignore[arg-type]


def _provenance(job: Plan, options: dict[str, Any]) -> dict[str, Any]:
    return {"producer": "lorastream", "version": __version__, "base": str(job.base.path.absolute()),
            "adapters": [{"path": str(Path(a.source).absolute()), "weight": w} for a, w in job.adapters],
            "options": options}


def merge(base: PathLike, adapters: PathLike | Sequence[PathLike], out: PathLike, *,
          weights: Sequence[float] | None = None, max_memory: str | int | None = None,
          dtype: str | None = None, max_shard_size: str | int = "5GB", quantize: str | None = None,
          double_quant: bool | None = None, trained_on: str | None = None, overwrite: bool = False,
          allow_nonfinite: bool = False, progress: Progress | None = None) -> MergeResult:
    """Merge LoRA adapters into a Hugging Face model, streaming within the memory budget.

    Raises `InputError` (bad input) or `ResourceError` (not enough memory or disk) before writing
    anything; the output folder appears only when complete.
    """
    started = time.perf_counter()
    out_dir = Path(out).absolute()
    inputs = [Path(base)] + [Path(a) for a in ([adapters] if isinstance(adapters, str | Path) else adapters)]
    for path in inputs:
        if path.exists() and out_dir.exists() and out_dir.samefile(path):
            raise InputError(f"{out_dir}: the output folder is one of the inputs; choose another -o folder")
    check_destination(out_dir, overwrite)
    job = plan(base, adapters, out_dir, weights=weights, max_memory=max_memory, dtype=dtype,
               max_shard_size=max_shard_size, quantize=quantize, double_quant=double_quant, trained_on=trained_on)
    shortfall = describe_shortfall(job)
    if shortfall:
        raise ResourceError(shortfall)
    options = {"dtype": dtype, "max_shard_size": job.max_shard_size, "quantize": quantize,
               "trained_on": trained_on, "double_quant": double_quant,
               "weights": [w for _, w in job.adapters]}
    record = _provenance(job, {**options, "max_memory": job.memory.budget})
    metadata = {"format": "pt", "lorastream": json.dumps(record, separators=(",", ":"))}
    inputs = [*job.base.weight_files, *job.base.companion_files, job.base.path / "config.json",
              *(p for a, _ in job.adapters for p in Path(a.source).iterdir() if p.is_file())]
    with staging_for(out_dir, job_id(inputs, options, __version__), overwrite) as staging:
        write_shards(job, lambda shard: ShardWriter(staging.path / shard.filename, shard.specs, metadata),
                     progress or (lambda _n: None), finished=staging.finished(), on_committed=staging.record,
                     allow_nonfinite=allow_nonfinite)
        write_companions(job, staging.path, {**record, "shards": staging.shards})
        promote(staging, out_dir)
    return MergeResult(out_dir, sorted(p.name for p in out_dir.iterdir()), job.total_size,
                       time.perf_counter() - started, peak_rss(), job.memory.budget)


def _summarize_tensors(tensors: dict[str, TensorRef]) -> dict[str, Any]:
    dtypes = Counter(str(ref.dtype).removeprefix("torch.") for ref in tensors.values())
    return {"tensors": len(tensors), "parameters": sum(r.numel for r in tensors.values()),
            "bytes": sum(r.nbytes for r in tensors.values()), "dtypes": dict(dtypes),
            "tensor_list": [{"name": n, "dtype": str(r.dtype).removeprefix("torch."), "shape": list(r.shape)}
                            for n, r in tensors.items()]}


def inspect(path: PathLike) -> dict[str, Any]:
    """Describe a model folder, an adapter folder or a single weight file (headers only)."""
    path = Path(path)
    if path.is_dir() and (path / "adapter_config.json").is_file():
        adapter = read_peft_adapter(path)
        refs = {**{f"{m}.lora_A": lora.a for m, lora in adapter.modules.items()},
                **{f"{m}.lora_B": lora.b for m, lora in adapter.modules.items()}, **adapter.replacements}
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
                "replacements": sorted(adapter.replacements)}
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
    if path.suffix == ".safetensors":
        header = read_header(path)
        return {"path": str(path), "format": "safetensors", **_summarize_tensors(header.tensors),
                "metadata": header.metadata}
    if path.suffix in (".bin", ".pth", ".pt", ".lora"):
        return {"path": str(path), "format": "torch-zip", **_summarize_tensors(read_state_dict(path))}
    if path.suffix == ".json":
        return {"path": str(path), "format": "json", "content": read_json(path)}
    raise InputError(f"{path}: not a model folder, adapter folder or weight file")


def verify(base: PathLike, adapters: PathLike | Sequence[PathLike], merged: PathLike, *,
           weights: Sequence[float] | None = None, max_memory: str | int | None = None, dtype: str | None = None,
           quantize: str | None = None, double_quant: bool | None = None, trained_on: str | None = None,
           exact: bool | None = None, progress: Progress | None = None) -> VerifyReport:
    """Recompute the merge of `adapters` into `base` block by block and compare it with `merged`.

    Options not given are taken from the merged folder's `lorastream.json` when it has one. `exact` (the
    default for lorastream's own outputs, which are deterministic) requires identical bytes; otherwise floats
    may differ by one rounding step at the element's and its row's magnitude (see `verification`).
    """
    merged_dir = Path(merged)
    recorded = _recorded_options(merged_dir)
    job = plan(base, adapters, merged_dir, weights=weights if weights is not None else recorded.get("weights"),
               max_memory=max_memory, dtype=dtype or recorded.get("dtype"),
               quantize=quantize or recorded.get("quantize"),
               double_quant=double_quant if double_quant is not None else recorded.get("double_quant"),
               trained_on=trained_on or recorded.get("trained_on"))
    if not job.memory.fits:
        raise ResourceError(describe_shortfall(job) or "not enough memory")
    stored: dict[str, TensorRef] = {}
    for path in sorted(merged_dir.glob("*.safetensors")):
        stored.update(read_header(path).tensors)
    if not stored:
        raise InputError(f"{merged_dir}: no safetensors files to verify")
    checks: dict[str, TensorCheck] = {}
    exact = bool(recorded) if exact is None else exact
    write_shards(job, lambda shard: Comparator(shard.specs, stored, checks, exact), progress or (lambda _n: None),
                 allow_nonfinite=True)
    return VerifyReport(list(checks.values()), sorted(set(stored) - set(checks)), peak_rss(), job.memory.budget)


def _recorded_options(merged: Path) -> dict[str, Any]:
    record = merged / PROVENANCE_FILE
    if not record.is_file():
        return {}
    options = read_json(record).get("options", {})
    return options if isinstance(options, dict) else {}


def _litgpt_destination(run: Path, base: Path, out: PathLike | None, format: str,
                        overwrite: bool) -> tuple[Path, bool]:
    """Where a LitGPT merge writes, and whether that is `lit_model.pth` inside the run folder (LitGPT's place)."""
    if format not in LITGPT_FORMATS:
        raise InputError(f"--format {format!r}: expected one of {', '.join(LITGPT_FORMATS)}")
    if out is None and format != "litgpt":
        raise InputError(f"--format {format} needs an output folder (-o)")
    out_dir = run.absolute() if out is None else Path(out).absolute()
    if format == "litgpt" and out_dir.exists() and out_dir.samefile(run):
        if (out_dir / MODEL_FILE).exists() and not overwrite:
            raise InputError(f"{out_dir / MODEL_FILE}: exists (merged before?); pass --overwrite to replace it")
        return out_dir, True
    for path, what in ((run, "the LoRA run"), (base, "the base checkpoint")):
        if out_dir.exists() and out_dir.samefile(path):
            raise InputError(f"{out_dir}: the output folder is {what}; choose another -o folder")
    check_destination(out_dir, overwrite)
    return out_dir, False


def merge_litgpt(lora_dir: PathLike, out: PathLike | None = None, *, base: PathLike | None = None,
                 max_memory: str | int | None = None, dtype: str | None = None, format: str = "litgpt",
                 max_shard_size: str | int = "5GB", overwrite: bool = False, allow_nonfinite: bool = False,
                 progress: Progress | None = None) -> MergeResult:
    """Merge a `litgpt finetune lora` run into its base as `litgpt merge_lora` does, streaming.

    The base is the run's recorded `checkpoint_dir` unless `base` is given. `format="litgpt"` writes
    `lit_model.pth` into the run folder (as LitGPT does; refused if one exists, unless `overwrite`), or a
    complete checkpoint folder `out`; `format="hf"` writes a Hugging Face folder `out` with LitGPT's key map.
    """
    started = time.perf_counter()
    if dtype is not None and dtype not in DTYPES:
        raise InputError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    run = read_lora_run(Path(lora_dir))
    base_model = open_litgpt_model(Path(base) if base is not None else run.base_dir)
    out_dir, in_place = _litgpt_destination(run.path, base_model.path, out, format, overwrite)
    probe = next((p for p in (out_dir, *out_dir.parents) if p.exists()), Path("/"))
    job = plan_litgpt(run, base_model, out_dir, fmt=format, dtype=DTYPES.get(dtype or ""),
                      budget=parse_size(max_memory) if max_memory is not None else default_budget(),
                      baseline=current_rss(), disk_free=shutil.disk_usage(probe).free,
                      max_shard_size=parse_size(max_shard_size))
    shortfall = describe_shortfall(job)
    if shortfall:
        raise ResourceError(shortfall)
    options = {"format": format, "dtype": dtype, "max_shard_size": job.max_shard_size}
    record = _provenance(job, {**options, "max_memory": job.memory.budget})
    metadata = {"format": "pt", "lorastream": json.dumps(record, separators=(",", ":"))}
    inputs = [*base_model.weight_files, *run.companions(base_model),
              *(p for p in run.path.iterdir() if p.is_file() and p.name != MODEL_FILE and p.name[0] != '.')]
    target = out_dir / MODEL_FILE if in_place else out_dir
    with staging_for(target, job_id(inputs, options, __version__), overwrite) as staging:
        def open_sink(shard: Shard) -> ShardSink:
            path = staging.path / shard.filename
            if format == "hf":
                return ShardWriter(path, shard.specs, metadata)
            return TorchZipWriter(path, shard.specs)

        write_shards(job, open_sink, progress or (lambda _n: None), finished=staging.finished(),
                     on_committed=staging.record, allow_nonfinite=allow_nonfinite)
        if in_place:
            os.replace(staging.path / MODEL_FILE, target)
            shutil.rmtree(staging.path)
        elif format == "hf":
            write_companions(job, staging.path, {**record, "shards": staging.shards})
            promote(staging, out_dir)
        else:
            for path in run.companions(base_model):
                shutil.copy2(path, staging.path / path.name)
            (staging.path / PROVENANCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
            promote(staging, out_dir)
    files = [MODEL_FILE] if in_place else sorted(p.name for p in out_dir.iterdir())
    return MergeResult(out_dir, files, job.total_size, time.perf_counter() - started, peak_rss(), job.memory.budget)
