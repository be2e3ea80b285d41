"""The Python API: the command line's verbs, each a few lines over the input families and the pipeline.

Every merge and plan function takes the merge options as one `MergeOptions` (`options=`) and/or as keyword
arguments of the same names (`max_memory="2GiB", dtype="bfloat16"`, ...); see `options.MergeOptions`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import pipeline
from .engine import Progress
from .extract import AdapterResult as AdapterResult  # the `extract` and `save_lora` verbs live in extract.py
from .extract import extract as extract
from .extract import save_lora as save_lora
from .formats.gguf import read_gguf_header
from .formats.gguf import tensor_refs as gguf_tensor_refs
from .formats.litgpt import MODEL_FILE
from .formats.torchzip import read_state_dict
from .inputs import hf as hf_input
from .inputs import litgpt as litgpt_input
from .inspection import inspect as inspect
from .io.locations import Location, location
from .options import MergeOptions
from .outputs.gguf import gguf_options
from .outputs.gguf_layout import generated_tensors
from .pipeline import MergeResult as MergeResult
from .planner import Plan
from .verification import VerifyReport, compare, compare_generated, recorded_options, safetensors_tensors

PathLike = str | os.PathLike[str]
# The options `verify` takes from a merged folder's lorastream.json when not given.
RECORDED = ("weights", "dtype", "quantize", "double_quant", "trained_on")


def plan(base: PathLike | None, adapters: PathLike | Sequence[PathLike], out: PathLike,
         options: MergeOptions | None = None, **fields: Any) -> Plan:
    """Plan a merge from headers only: output layout, memory and disk needs. Nothing is written.

    `quantize` ("nf4", "fp4", "int8") writes linear weights in bitsandbytes' format; `trained_on` ("nf4",
    "fp4") merges into the base as QLoRA training saw it, `dequantize(quantize(W))`; `double_quant`
    (default: on for nf4) applies to both. `device` ("cpu", "cuda", "auto", or an `Accelerator`) is where the
    blocks are merged; on a GPU they must also fit `max_gpu_memory` (default: 80% of its free memory).
    """
    return hf_input.plan(base, adapters, out, MergeOptions.of(options, fields))


def plan_each(base: PathLike | None, adapters: Sequence[PathLike], out: PathLike, options: MergeOptions | None = None,
              **fields: Any) -> list[Plan]:
    """Plan merging each adapter into `base` on its own, into `out/<adapter folder name>/`, all in one pass
    over the base (see `merge_each`); the plans share one memory budget and the disk. Nothing is written."""
    return hf_input.plan_each(base, adapters, out, MergeOptions.of(options, fields))


def merge(base: PathLike | None, adapters: PathLike | Sequence[PathLike], out: PathLike,
          options: MergeOptions | None = None, *, progress: Progress | None = None, **fields: Any) -> MergeResult:
    """Merge LoRA adapters into a Hugging Face model, streaming within the memory budget.

    `base` is a model folder, a URL, or a Hub repo id (`org/name`, at `revision`) found in the local Hugging
    Face cache as `from_pretrained` finds it (else read from the Hub); None takes the first adapter's
    `base_model_name_or_path`.

    Raises `InputError` (bad input) or `ResourceError` (not enough memory or disk) before writing
    anything; the output folder appears only when complete. `executor="ray"` writes each shard in a Ray
    task (on the Ray instance at `ray_address`, else this machine's), each within `max_memory`. `device`
    (see `plan`) merges on a GPU: within `max_gpu_memory` there, and within `max_memory` on the host.
    """
    chosen = MergeOptions.of(options, fields)
    out_dir = location(out).absolute()
    paths = hf_input.adapter_paths(adapters)
    model = hf_input.resolve_base(base, paths, chosen.revision)
    hf_input.check_output(model, paths, out_dir, chosen.overwrite, chosen.format == "gguf")
    gpu = hf_input.gpu(chosen)
    jobs = hf_input.plan_pass(model, [(paths, chosen.weights)], [out_dir], chosen, gpu)
    return pipeline.run(hf_input.outputs(jobs, chosen, gpu), chosen, progress, gpu)[0]


def merge_each(base: PathLike | None, adapters: Sequence[PathLike], out: PathLike, options: MergeOptions | None = None,
               *, progress: Progress | None = None, **fields: Any) -> list[MergeResult]:
    """Merge each adapter into `base` on its own, into `out/<adapter folder name>/`, in one pass over the base.

    Every row block of the base is read and decoded once, then merged into each output in turn, all within
    `max_memory`. Each output holds the same files and bytes as `merge(base, adapter, out/<name>)` with the
    same options, and has its own staging folder: atomic, and resumed by rerunning the same command.
    """
    chosen = MergeOptions.of(options, fields)
    out_dirs = hf_input.each_destinations(adapters, out, hf_input.suffix(chosen))
    model = hf_input.resolve_base(base, adapters, chosen.revision)
    for adapter, out_dir in zip(adapters, out_dirs, strict=True):
        hf_input.check_output(model, [adapter], out_dir, chosen.overwrite, chosen.format == "gguf")
    gpu = hf_input.gpu(chosen)
    jobs = hf_input.plan_pass(model, [([a], None) for a in adapters], out_dirs, chosen, gpu)
    return pipeline.run(hf_input.outputs(jobs, chosen, gpu), chosen, progress, gpu)


def verify(base: PathLike | None, adapters: PathLike | Sequence[PathLike], merged: PathLike,
           options: MergeOptions | None = None, *, exact: bool | None = None, progress: Progress | None = None,
           **fields: Any) -> VerifyReport:
    """Recompute the merge of `adapters` into `base` block by block and compare it with `merged`.

    Options not given are taken from the merged folder's `lorastream.json` when it has one. `exact` (the
    default for lorastream's own outputs merged on the CPU, which are deterministic) requires identical bytes;
    otherwise floats may differ by one rounding step at the element's and its row's magnitude (see
    `verification`).
    """
    merged_dir = location(merged)
    if merged_dir.suffix == ".gguf":
        return _verify_gguf(merged_dir, lambda chosen: hf_input.plan(base, adapters, merged_dir, chosen),
                            {**(options.given() if options else {}), **fields}, exact, progress)
    recorded = recorded_options(merged_dir, (*RECORDED, "device"))  # type: ignore[arg-type]
    chosen = MergeOptions.of(MergeOptions(**{k: v for k, v in recorded.items() if k != "device"}),
                             {**(options.given() if options else {}), **fields})
    job = hf_input.plan(base, adapters, merged_dir, MergeOptions.of(chosen, {"device": "cpu"}))
    exact = (merged_dir / "lorastream.json").is_file() and "device" not in recorded if exact is None else exact
    return compare(job, safetensors_tensors(merged_dir), exact, progress)  # type: ignore[arg-type]


def _verify_gguf(path: Location, plan: Callable[[MergeOptions], Plan], given: dict[str, Any], exact: bool | None,
                 progress: Progress | None) -> VerifyReport:
    """Recompute a GGUF with the options its file type names (and those `given`): every merged tensor, exact
    unless `exact` is False, and the tensors the converter computes from config.json."""
    header = read_gguf_header(path)
    job = plan(MergeOptions.of(MergeOptions(**gguf_options(header.metadata)), {**given, "device": "cpu"}))
    stored = gguf_tensor_refs(header)
    report = compare(job, stored, True if exact is None else exact, progress)
    return compare_generated(report, stored, generated_tensors(job.base.config, job.base.path))


def plan_litgpt(lora_dir: PathLike, out: PathLike | None = None, options: MergeOptions | None = None, *,
                base: PathLike | None = None, **fields: Any) -> Plan:
    """Plan `merge_litgpt` with the same arguments from headers only: layout, memory and disk. Nothing is written."""
    chosen = MergeOptions.of(options, fields)
    run, base_model = litgpt_input.open_run(lora_dir, base)
    return litgpt_input.plan(run, base_model, litgpt_input.out_dir(run, out, chosen), chosen)


def merge_litgpt(lora_dir: PathLike, out: PathLike | None = None, options: MergeOptions | None = None, *,
                 base: PathLike | None = None, progress: Progress | None = None, **fields: Any) -> MergeResult:
    """Merge a `litgpt finetune lora` run into its base as `litgpt merge_lora` does, streaming.

    The base is the run's recorded `checkpoint_dir` unless `base` is given. `format="litgpt"` writes
    `lit_model.pth` into the run folder (as LitGPT does; refused if one exists, unless `overwrite`), or a
    complete checkpoint folder `out`; `format="hf"` writes a Hugging Face folder `out` with LitGPT's key map
    (`quantize`: linear weights in bitsandbytes' format). `trained_on` ("nf4", "fp4") merges into the base
    as QLoRA training saw it, `dequantize(quantize(W))`; LitGPT itself merges into the dense base.
    """
    chosen = MergeOptions.of(options, fields)
    run, base_model = litgpt_input.open_run(lora_dir, base)
    folder = litgpt_input.out_dir(run, out, chosen)
    target = litgpt_input.destination(run, base_model, folder, chosen)
    job = litgpt_input.plan(run, base_model, folder, chosen)
    return pipeline.run([litgpt_input.output(run, base_model, job, chosen, target)], chosen, progress)[0]


def verify_litgpt(lora_dir: PathLike, merged: PathLike, options: MergeOptions | None = None, *,
                  base: PathLike | None = None, exact: bool = True, progress: Progress | None = None,
                  **fields: Any) -> VerifyReport:
    """Recompute the merge of a LitGPT LoRA run and compare it with `merged`: a `lit_model.pth` (or a folder
    holding one), a `format="hf"` folder, or a GGUF.

    Options not given are taken from the folder's `lorastream.json` when it has one (from a GGUF's file type).
    Exact by default: lorastream and `litgpt merge_lora` (and `litgpt convert_from_litgpt` after it) write the
    same bits.
    """
    path = Path(merged)
    if path.suffix == ".gguf":
        run, base_model = litgpt_input.open_run(lora_dir, base)
        return _verify_gguf(path, lambda chosen: litgpt_input.plan(run, base_model, path.absolute(), chosen),
                            {**(options.given() if options else {}), **fields}, exact, progress)
    folder = path.parent if path.is_file() else path
    if path.is_file() or (path / MODEL_FILE).is_file():
        format, stored = "litgpt", read_state_dict(path if path.is_file() else path / MODEL_FILE)
    else:
        format, stored = "hf", safetensors_tensors(folder)
    recorded = recorded_options(folder, ("dtype", "double_quant", "trained_on", "max_shard_size",
                                         *(("quantize",) if format == "hf" else ())))
    chosen = MergeOptions.of(MergeOptions(**recorded, format=format), {**(options.given() if options else {}),
                                                                       **fields})
    run, base_model = litgpt_input.open_run(lora_dir, base)
    return compare(litgpt_input.plan(run, base_model, folder.absolute(), chosen), stored, exact, progress)
