"""The Python API: `plan`, `merge` and `inspect`, the same verbs as the command line."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import ray_executor
from .adapters.litgpt import lora_dtype
from .adapters.lora import Adapter
from .adapters.peft import read_peft_adapter
from .codecs import Encoding
from .codecs.bnb4 import Bnb4Encoding
from .codecs.int8 import Int8Encoding
from .codecs.plain import TensorRef
from .device import Accelerator, accelerator
from .dtypes import FLOAT_DTYPES, config_dtype
from .engine import Progress, ShardSink, write_outputs, write_shards
from .errors import InputError, ResourceError
from .extract import AdapterResult as AdapterResult  # the `extract` and `save_lora` verbs live in extract.py
from .extract import extract as extract
from .extract import save_lora as save_lora
from .formats.hf import HFModel, open_hf_model, read_json
from .formats.litgpt import CONFIG_FILE, MODEL_FILE, LoraRun, is_lora_run, open_litgpt_model, read_lora_run
from .formats.safetensors import ShardWriter, read_header
from .formats.torchzip import read_state_dict
from .formats.torchzip_writer import TorchZipWriter
from .litgpt import FORMATS as LITGPT_FORMATS
from .litgpt import family_of
from .litgpt import plan_litgpt as plan_litgpt_job
from .memory import current_rss, default_budget, parse_size, peak_rss
from .output import PROVENANCE_FILE, check_destination, write_companions
from .planner import MAX_BLOCK_ELEMENTS, Plan, Shard, describe_shortfall, make_plans
from .staging import Staging, job_id, promote, staging_for
from .storage import NO_DISK_LIMIT, Location, io_buffer_bytes, is_remote, is_url, location
from .verification import Comparator, TensorCheck, VerifyReport
from .version import __version__

EXECUTORS = ("local", "ray")
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


def _adapter_paths(adapters: PathLike | Sequence[PathLike]) -> list[PathLike]:
    return [adapters] if isinstance(adapters, str | Path) else list(adapters)


def _adapters(adapters: PathLike | Sequence[PathLike], weights: Sequence[float] | None) -> list[tuple[Adapter, float]]:
    paths = _adapter_paths(adapters)
    if not paths:
        raise InputError("no adapter given")
    weights = list(weights) if weights is not None else [1.0] * len(paths)
    if len(weights) != len(paths):
        raise InputError(f"--weights has {len(weights)} values for {len(paths)} adapters")
    return [(read_peft_adapter(location(p)), float(w)) for p, w in zip(paths, weights, strict=True)]


def _encoding(quantize: str | None, double_quant: bool | None, dtype: torch.dtype | None,
              model: HFModel, option: str = "--quantize") -> Encoding | None:
    if quantize is None:
        return None
    if quantize == "int8" and option == "--quantize":
        return Int8Encoding()
    if quantize not in ("nf4", "fp4"):
        raise InputError(f"{option} {quantize!r}: expected nf4 or fp4" + (" or int8" if option == "--quantize" else ""))
    compute = dtype or config_dtype(model.config, torch.bfloat16)
    return Bnb4Encoding(quantize, quantize == "nf4" if double_quant is None else double_quant, compute)


def plan(base: PathLike, adapters: PathLike | Sequence[PathLike], out: PathLike, *,
         weights: Sequence[float] | None = None, max_memory: str | int | None = None,
         dtype: str | None = None, max_shard_size: str | int = "5GB", quantize: str | None = None,
         double_quant: bool | None = None, trained_on: str | None = None, device: str | Accelerator = "cpu",
         max_gpu_memory: str | int | None = None) -> Plan:
    """Plan a merge from headers only: output layout, memory and disk needs. Nothing is written.

    `quantize` ("nf4", "fp4", "int8") writes linear weights in bitsandbytes' format; `trained_on` ("nf4",
    "fp4") merges into the base as QLoRA training saw it, `dequantize(quantize(W))`; `double_quant`
    (default: on for nf4) applies to both. `device` ("cpu", "cuda", "auto", or an `Accelerator`) is where the
    blocks are merged; on a GPU they must also fit `max_gpu_memory` (default: 80% of its free memory).
    """
    return _plan_pass(base, [(_adapter_paths(adapters), weights)], [location(out).absolute()], max_memory=max_memory,
                      dtype=dtype, max_shard_size=max_shard_size, quantize=quantize, double_quant=double_quant,
                      trained_on=trained_on, accelerator=_accelerator(device, max_gpu_memory))[0]


def plan_each(base: PathLike, adapters: Sequence[PathLike], out: PathLike, *, max_memory: str | int | None = None,
              dtype: str | None = None, max_shard_size: str | int = "5GB", quantize: str | None = None,
              double_quant: bool | None = None, trained_on: str | None = None, device: str | Accelerator = "cpu",
              max_gpu_memory: str | int | None = None) -> list[Plan]:
    """Plan merging each adapter into `base` on its own, into `out/<adapter folder name>/`, all in one pass
    over the base (see `merge_each`); the plans share one memory budget and the disk. Nothing is written."""
    return _plan_pass(base, [([a], None) for a in adapters], each_destinations(adapters, out), max_memory=max_memory,
                      dtype=dtype, max_shard_size=max_shard_size, quantize=quantize, double_quant=double_quant,
                      trained_on=trained_on, accelerator=_accelerator(device, max_gpu_memory))


def _accelerator(device: str | Accelerator, max_gpu_memory: str | int | None) -> Accelerator | None:
    """The accelerator `device` names (an `Accelerator` is taken as given: tests pass the CPU as one)."""
    return device if isinstance(device, Accelerator) else accelerator(device, max_gpu_memory)


def each_destinations(adapters: Sequence[PathLike], out: PathLike) -> list[Location]:
    """`out/<adapter folder name>` for every adapter; two adapters with the same folder name are refused."""
    if not adapters:
        raise InputError("--each: no adapter given")
    names = [location(a).name for a in adapters]
    for name in names:
        if names.count(name) > 1:
            same = [str(a) for a, n in zip(adapters, names, strict=True) if n == name]
            raise InputError(f"--each: adapters {', '.join(same)} share the folder name {name!r}, which names their "
                             "output folder; rename or link one of them")
    return [(location(out) / name).absolute() for name in names]


def _plan_pass(base: PathLike, jobs: list[tuple[list[PathLike], Sequence[float] | None]], out_dirs: list[Location], *,
               max_memory: str | int | None, dtype: str | None, max_shard_size: str | int, quantize: str | None,
               double_quant: bool | None, trained_on: str | None, accelerator: Accelerator | None) -> list[Plan]:
    """Plans of one pass over `base`: each job (adapters, weights) merged into its output folder."""
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise InputError(f"--dtype {dtype!r}: expected one of {', '.join(FLOAT_DTYPES)}")
    model = open_hf_model(location(base))
    chosen = FLOAT_DTYPES.get(dtype or "")
    shard_bytes = parse_size(max_shard_size)
    remote_inputs = [model.path, *(location(a) for paths, _ in jobs for a in paths)]
    io_buffers = sum(io_buffer_bytes(remote_inputs if k == 0 else [], out_dir, shard_bytes, 4 * MAX_BLOCK_ELEMENTS)
                     for k, out_dir in enumerate(out_dirs))
    return make_plans(model, [_adapters(paths, weights) for paths, weights in jobs], out_dirs,  # type: ignore[arg-type]
                      budget=parse_size(max_memory) if max_memory is not None else default_budget(),
                      baseline=current_rss(), disk_free=_disk_free(out_dirs[0]),
                      max_shard_size=shard_bytes, dtype=chosen,
                      quantize=_encoding(quantize, double_quant, chosen, model),
                      trained_on=_encoding(trained_on, double_quant, None, model, "--trained-on"),  # type: ignore[arg-type]
                      io_buffers=io_buffers, gpu_budget=accelerator.budget if accelerator is not None else 0)


def _disk_free(out_dir: Location) -> int:
    """Free space where OUT is written; an object store has no such limit."""
    if is_remote(out_dir):
        return NO_DISK_LIMIT
    probe = next((p for p in (out_dir, *out_dir.parents) if p.exists()), Path("/"))
    return shutil.disk_usage(probe).free


def _provenance(job: Plan, options: dict[str, Any]) -> dict[str, Any]:
    return {"producer": "lorastream", "version": __version__, "base": str(job.base.path.absolute()),
            "adapters": [{"path": str(location(a.source).absolute()), "weight": w} for a, w in job.adapters],
            "options": options}


def _portable(value: PathLike) -> str:
    """A path a Ray worker on another machine can open: absolute, or the URL as given."""
    return str(value) if is_url(value) else str(Path(value).absolute())


def shard_opener(folder: Location, metadata: dict[str, str]) -> Callable[[Shard], ShardSink]:
    """How a merge opens each shard in its staging folder: here, and in a Ray worker writing one shard."""
    return lambda shard: ShardWriter(folder / shard.filename, shard.specs, metadata)


def merge(base: PathLike, adapters: PathLike | Sequence[PathLike], out: PathLike, *,
          weights: Sequence[float] | None = None, max_memory: str | int | None = None,
          dtype: str | None = None, max_shard_size: str | int = "5GB", quantize: str | None = None,
          double_quant: bool | None = None, trained_on: str | None = None, overwrite: bool = False,
          allow_nonfinite: bool = False, progress: Progress | None = None, executor: str = "local",
          ray_address: str | None = None, device: str | Accelerator = "cpu",
          max_gpu_memory: str | int | None = None) -> MergeResult:
    """Merge LoRA adapters into a Hugging Face model, streaming within the memory budget.

    Raises `InputError` (bad input) or `ResourceError` (not enough memory or disk) before writing
    anything; the output folder appears only when complete. `executor="ray"` writes each shard in a Ray
    task (on the Ray instance at `ray_address`, else this machine's), each within `max_memory`. `device`
    (see `plan`) merges on a GPU: within `max_gpu_memory` there, and within `max_memory` on the host.
    """
    started = time.perf_counter()
    if executor not in EXECUTORS:
        raise InputError(f"--executor {executor!r}: expected one of {', '.join(EXECUTORS)}")
    out_dir = location(out).absolute()
    _check_output(base, _adapter_paths(adapters), out_dir, overwrite)
    plan_options = {"weights": weights, "max_memory": max_memory, "dtype": dtype, "max_shard_size": max_shard_size,
                    "quantize": quantize, "double_quant": double_quant, "trained_on": trained_on}
    gpu = _accelerator(device, max_gpu_memory)
    if gpu is not None and executor != "local":
        raise InputError("--device: merging on a GPU runs on the local executor only")
    job = plan(base, adapters, out_dir, **plan_options, device=gpu or "cpu")
    shortfall = describe_shortfall(job)
    if shortfall:
        raise ResourceError(shortfall)
    if executor == "ray":  # before staging: a failure there would discard a resumable partial output
        ray_executor.connect(ray_address, job.memory.budget)
    identity = _identity(job, dtype, quantize, trained_on, double_quant, gpu)
    metadata = identity[1]

    def write(stagings: list[Staging]) -> None:
        staging = stagings[0]
        if executor == "ray":
            task = ray_executor.ShardJob(_portable(base), tuple(_portable(a) for a in _adapter_paths(adapters)),
                                         _portable(out), {**plan_options, "max_memory": job.memory.budget},
                                         str(staging.path), metadata, allow_nonfinite)
            ray_executor.write_shards_on_ray(job, task, staging, progress or (lambda _n: None), ray_address)
        else:
            write_shards(job, shard_opener(staging.path, metadata), progress or (lambda _n: None),
                         finished=staging.finished(), on_committed=staging.record, allow_nonfinite=allow_nonfinite,
                         accelerator=gpu)

    _stage_and_promote([job], [identity], overwrite, write)
    return MergeResult(out_dir, sorted(p.name for p in out_dir.iterdir()), job.total_size,
                       time.perf_counter() - started, peak_rss(), job.memory.budget)


def merge_each(base: PathLike, adapters: Sequence[PathLike], out: PathLike, *, max_memory: str | int | None = None,
               dtype: str | None = None, max_shard_size: str | int = "5GB", quantize: str | None = None,
               double_quant: bool | None = None, trained_on: str | None = None, overwrite: bool = False,
               allow_nonfinite: bool = False, progress: Progress | None = None, device: str | Accelerator = "cpu",
               max_gpu_memory: str | int | None = None) -> list[MergeResult]:
    """Merge each adapter into `base` on its own, into `out/<adapter folder name>/`, in one pass over the base.

    Every row block of the base is read and decoded once, then merged into each output in turn, all within
    `max_memory`. Each output holds the same files and bytes as `merge(base, adapter, out/<name>)` with the
    same options, and has its own staging folder: atomic, and resumed by rerunning the same command.
    """
    started = time.perf_counter()
    out_dirs = each_destinations(adapters, out)
    for adapter, out_dir in zip(adapters, out_dirs, strict=True):
        _check_output(base, [adapter], out_dir, overwrite)
    gpu = _accelerator(device, max_gpu_memory)
    jobs = plan_each(base, adapters, out, max_memory=max_memory, dtype=dtype, max_shard_size=max_shard_size,
                     quantize=quantize, double_quant=double_quant, trained_on=trained_on, device=gpu or "cpu")
    shortfall = describe_shortfall(*jobs)
    if shortfall:
        raise ResourceError(shortfall)
    identities = [_identity(job, dtype, quantize, trained_on, double_quant, gpu) for job in jobs]

    def write(stagings: list[Staging]) -> None:
        openers = [shard_opener(staging.path, metadata) for staging, (_, metadata, _) in zip(stagings, identities,
                                                                                             strict=True)]
        write_outputs(jobs, lambda k, shard: openers[k](shard), progress or (lambda _n: None),
                      finished=[staging.finished() for staging in stagings],
                      on_committed=lambda k, name, size, crc: stagings[k].record(name, size, crc),
                      allow_nonfinite=allow_nonfinite, accelerator=gpu)

    _stage_and_promote(jobs, identities, overwrite, write)
    seconds = time.perf_counter() - started
    return [MergeResult(job.out_dir, sorted(p.name for p in job.out_dir.iterdir()), job.total_size, seconds,
                        peak_rss(), job.memory.budget) for job in jobs]


def _stage_and_promote(jobs: list[Plan], identities: list[tuple[dict[str, Any], dict[str, str], str]],
                       overwrite: bool, write: Callable[[list[Staging]], None]) -> None:
    """Give each output its own staging folder (lock, manifest, resume), let `write` fill their shards, then add
    the companions and move each output into place: the same steps for `merge` and `merge_each`."""
    with ExitStack() as stack:
        stagings = [stack.enter_context(staging_for(job.out_dir, key, overwrite))
                    for job, (_, _, key) in zip(jobs, identities, strict=True)]
        write(stagings)
        for job, staging, (record, _, _) in zip(jobs, stagings, identities, strict=True):
            write_companions(job, staging.path, {**record, "shards": staging.shards})
            promote(staging, job.out_dir)


def _check_output(base: PathLike, adapters: Sequence[PathLike], out_dir: Location, overwrite: bool) -> None:
    """Refuse an output folder that is one of the inputs, or holds something not to be replaced."""
    for path in [location(base), *(location(a) for a in adapters)]:
        if is_remote(path) == is_remote(out_dir) and path.exists() and out_dir.exists() and out_dir.samefile(path):
            raise InputError(f"{out_dir}: the output folder is one of the inputs; choose another -o folder")
    check_destination(out_dir, overwrite)


def _identity(job: Plan, dtype: str | None, quantize: str | None, trained_on: str | None,
              double_quant: bool | None, gpu: Accelerator | None = None) -> tuple[dict[str, Any], dict[str, str], str]:
    """What an output records about how it was made (provenance, shard metadata), and the job id its staging
    folder is resumed by: the same for a merge on its own and the same merge within `merge_each`. A GPU merge
    records its device: its bytes may differ from the CPU's by rounding, so `verify` then compares with
    tolerance."""
    options = {"dtype": dtype, "max_shard_size": job.max_shard_size, "quantize": quantize,
               "trained_on": trained_on, "double_quant": double_quant,
               "weights": [w for _, w in job.adapters]}
    if gpu is not None and gpu.device.type != "cpu":
        options["device"] = str(gpu.device)
    record = _provenance(job, {**options, "max_memory": job.memory.budget})
    metadata = {"format": "pt", "lorastream": json.dumps(record, separators=(",", ":"))}
    inputs = [*job.base.weight_files, *job.base.companion_files, job.base.path / "config.json",
              *(p for a, _ in job.adapters for p in location(a.source).iterdir() if p.is_file())]
    return record, metadata, job_id(inputs, options, __version__)


def _summarize_tensors(tensors: dict[str, TensorRef]) -> dict[str, Any]:
    dtypes = Counter(str(ref.dtype).removeprefix("torch.") for ref in tensors.values())
    return {"tensors": len(tensors), "parameters": sum(r.numel for r in tensors.values()),
            "bytes": sum(r.nbytes for r in tensors.values()), "dtypes": dict(dtypes),
            "tensor_list": [{"name": n, "dtype": str(r.dtype).removeprefix("torch."), "shape": list(r.shape)}
                            for n, r in tensors.items()]}


def inspect(path: PathLike) -> dict[str, Any]:
    """Describe a model folder, an adapter folder or a single weight file (headers only)."""
    path = location(path)
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
    default for lorastream's own outputs merged on the CPU, which are deterministic) requires identical bytes;
    otherwise floats may differ by one rounding step at the element's and its row's magnitude (see
    `verification`).
    """
    merged_dir = location(merged)
    recorded = _recorded_options(merged_dir)
    job = plan(base, adapters, merged_dir, weights=weights if weights is not None else recorded.get("weights"),
               max_memory=max_memory, dtype=dtype or recorded.get("dtype"),
               quantize=quantize or recorded.get("quantize"),
               double_quant=double_quant if double_quant is not None else recorded.get("double_quant"),
               trained_on=trained_on or recorded.get("trained_on"))
    exact = bool(recorded) and "device" not in recorded if exact is None else exact
    return _compare(job, _safetensors_tensors(merged_dir), exact, progress)


def _safetensors_tensors(folder: Path) -> dict[str, TensorRef]:
    stored: dict[str, TensorRef] = {}
    for path in sorted(folder.glob("*.safetensors")):
        stored.update(read_header(path).tensors)
    if not stored:
        raise InputError(f"{folder}: no safetensors files to verify")
    return stored


def _compare(job: Plan, stored: dict[str, TensorRef], exact: bool, progress: Progress | None) -> VerifyReport:
    """Run the plan's merge into comparators against `stored` (the merged checkpoint's tensors)."""
    if not job.memory.fits:
        raise ResourceError(describe_shortfall(job) or "not enough memory")
    checks: dict[str, TensorCheck] = {}
    write_shards(job, lambda shard: Comparator(shard.specs, stored, checks, exact), progress or (lambda _n: None),
                 allow_nonfinite=True)
    return VerifyReport(list(checks.values()), sorted(set(stored) - set(checks)), peak_rss(), job.memory.budget)


def _recorded_options(merged: Path) -> dict[str, Any]:
    record = merged / PROVENANCE_FILE
    if not record.is_file():
        return {}
    options = read_json(record).get("options", {})
    return options if isinstance(options, dict) else {}


def _open_litgpt(lora_dir: PathLike, base: PathLike | None) -> tuple[LoraRun, HFModel]:
    run = read_lora_run(Path(lora_dir))
    return run, open_litgpt_model(Path(base) if base is not None else run.base_dir)


def _litgpt_out(run: LoraRun, out: PathLike | None, format: str) -> Path:
    """Where a LitGPT merge writes: `out`, else the run folder (`lit_model.pth` beside the LoRA, LitGPT's place)."""
    if format not in LITGPT_FORMATS:
        raise InputError(f"--format {format!r}: expected one of {', '.join(LITGPT_FORMATS)}")
    if out is None and format != "litgpt":
        raise InputError(f"--format {format} needs an output folder (-o)")
    return run.path.absolute() if out is None else Path(out).absolute()


def _litgpt_destination(run: Path, base: Path, out_dir: Path, format: str, overwrite: bool) -> bool:
    """Refuse a destination that would overwrite an input or a result; True for `lit_model.pth` in the run."""
    if format == "litgpt" and out_dir.exists() and out_dir.samefile(run):
        if (out_dir / MODEL_FILE).exists() and not overwrite:
            raise InputError(f"{out_dir / MODEL_FILE}: exists (merged before?); pass --overwrite to replace it")
        return True
    for path, what in ((run, "the LoRA run"), (base, "the base checkpoint")):
        if out_dir.exists() and out_dir.samefile(path):
            raise InputError(f"{out_dir}: the output folder is {what}; choose another -o folder")
    check_destination(out_dir, overwrite)
    return False


def _plan_litgpt(run: LoraRun, base_model: HFModel, out_dir: Path, *, format: str, max_memory: str | int | None,
                 dtype: str | None, max_shard_size: str | int, quantize: str | None, double_quant: bool | None,
                 trained_on: str | None) -> Plan:
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise InputError(f"--dtype {dtype!r}: expected one of {', '.join(FLOAT_DTYPES)}")
    chosen = FLOAT_DTYPES.get(dtype or "")
    merged = chosen or lora_dtype(run)
    # LitGPT's `--quantize bnb.nf4` quantizes without double quantization, `bnb.nf4-dq` with it
    trained_dq = double_quant if double_quant is not None else str(run.hyperparameters.get("quantize")).endswith("-dq")
    probe = next((p for p in (out_dir, *out_dir.parents) if p.exists()), Path("/"))
    return plan_litgpt_job(run, base_model, out_dir, fmt=format, dtype=chosen,
                           budget=parse_size(max_memory) if max_memory is not None else default_budget(),
                           baseline=current_rss(), disk_free=shutil.disk_usage(probe).free,
                           max_shard_size=parse_size(max_shard_size),
                           quantize=_encoding(quantize, double_quant, merged, base_model),
                           trained_on=_encoding(trained_on, trained_dq, merged, base_model,  # type: ignore[arg-type]
                                                "--trained-on"))


def plan_litgpt(lora_dir: PathLike, out: PathLike | None = None, *, base: PathLike | None = None,
                max_memory: str | int | None = None, dtype: str | None = None, format: str = "litgpt",
                max_shard_size: str | int = "5GB", quantize: str | None = None, double_quant: bool | None = None,
                trained_on: str | None = None) -> Plan:
    """Plan `merge_litgpt` with the same arguments from headers only: layout, memory and disk. Nothing is written."""
    run, base_model = _open_litgpt(lora_dir, base)
    return _plan_litgpt(run, base_model, _litgpt_out(run, out, format), format=format, max_memory=max_memory,
                        dtype=dtype, max_shard_size=max_shard_size, quantize=quantize, double_quant=double_quant,
                        trained_on=trained_on)


def merge_litgpt(lora_dir: PathLike, out: PathLike | None = None, *, base: PathLike | None = None,
                 max_memory: str | int | None = None, dtype: str | None = None, format: str = "litgpt",
                 max_shard_size: str | int = "5GB", quantize: str | None = None, double_quant: bool | None = None,
                 trained_on: str | None = None, overwrite: bool = False, allow_nonfinite: bool = False,
                 progress: Progress | None = None) -> MergeResult:
    """Merge a `litgpt finetune lora` run into its base as `litgpt merge_lora` does, streaming.

    The base is the run's recorded `checkpoint_dir` unless `base` is given. `format="litgpt"` writes
    `lit_model.pth` into the run folder (as LitGPT does; refused if one exists, unless `overwrite`), or a
    complete checkpoint folder `out`; `format="hf"` writes a Hugging Face folder `out` with LitGPT's key map
    (`quantize`: linear weights in bitsandbytes' format). `trained_on` ("nf4", "fp4") merges into the base
    as QLoRA training saw it, `dequantize(quantize(W))`, with double quantization as the run's `quantize`
    says (`bnb.nf4-dq`) unless `double_quant` is given; LitGPT itself merges into the dense base.
    """
    started = time.perf_counter()
    run, base_model = _open_litgpt(lora_dir, base)
    out_dir = _litgpt_out(run, out, format)
    in_place = _litgpt_destination(run.path, base_model.path, out_dir, format, overwrite)
    job = _plan_litgpt(run, base_model, out_dir, format=format, max_memory=max_memory, dtype=dtype,
                       max_shard_size=max_shard_size, quantize=quantize, double_quant=double_quant,
                       trained_on=trained_on)
    shortfall = describe_shortfall(job)
    if shortfall:
        raise ResourceError(shortfall)
    options = {"format": format, "dtype": dtype, "max_shard_size": job.max_shard_size, "quantize": quantize,
               "trained_on": trained_on, "double_quant": double_quant}
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


def verify_litgpt(lora_dir: PathLike, merged: PathLike, *, base: PathLike | None = None,
                  max_memory: str | int | None = None, dtype: str | None = None, double_quant: bool | None = None,
                  trained_on: str | None = None, exact: bool = True, progress: Progress | None = None) -> VerifyReport:
    """Recompute the merge of a LitGPT LoRA run and compare it with `merged`: a `lit_model.pth` (or a folder
    holding one) or a `format="hf"` folder.

    Options not given are taken from the folder's `lorastream.json` when it has one. Exact by default:
    lorastream and `litgpt merge_lora` (and `litgpt convert_from_litgpt` after it) write the same bits.
    """
    path = Path(merged)
    folder = path.parent if path.is_file() else path
    if path.is_file() or (path / MODEL_FILE).is_file():
        format, stored = "litgpt", read_state_dict(path if path.is_file() else path / MODEL_FILE)
    else:
        format, stored = "hf", _safetensors_tensors(folder)
    recorded = _recorded_options(folder)
    run, base_model = _open_litgpt(lora_dir, base)
    job = _plan_litgpt(run, base_model, folder.absolute(), format=format, max_memory=max_memory,
                       dtype=dtype or recorded.get("dtype"), max_shard_size=recorded.get("max_shard_size", "5GB"),
                       quantize=recorded.get("quantize") if format == "hf" else None,
                       double_quant=double_quant if double_quant is not None else recorded.get("double_quant"),
                       trained_on=trained_on or recorded.get("trained_on"))
    return _compare(job, stored, exact, progress)


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
