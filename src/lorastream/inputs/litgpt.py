"""The LitGPT family: a `litgpt finetune lora` run merged into its base checkpoint, as `litgpt merge_lora`
does, written as `lit_model.pth` (in the run folder, or a new checkpoint folder), a Hugging Face folder, or a
GGUF file."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from ..adapters.litgpt import lora_dtype, read_litgpt_adapter
from ..codecs import encoding_for
from ..dtypes import FLOAT_DTYPES
from ..errors import InputError
from ..formats.hf import HFModel
from ..formats.litgpt import MODEL_FILE, LoraRun, open_litgpt_model, read_lora_run
from ..io.locations import disk_free
from ..io.staging import job_id
from ..litgpt import hf_view, litgpt_view
from ..memory import current_rss, default_budget, parse_size
from ..options import MergeOptions
from ..outputs import writer
from ..outputs.base import Output, check_destination, provenance
from ..outputs.gguf import STAGED_NAME, GGUFArranger, GGUFFile, check_types
from ..planner import HEADER_ALLOWANCE, Plan, Shard, make_plan
from ..version import __version__

PathLike = str | os.PathLike[str]


def open_run(lora_dir: PathLike, base: PathLike | None) -> tuple[LoraRun, HFModel]:
    """The run and its base: `base`, else the checkpoint_dir its hyperparameters.yaml records."""
    run = read_lora_run(Path(lora_dir))
    return run, open_litgpt_model(Path(base) if base is not None else run.base_dir)


def output_format(options: MergeOptions) -> str:
    return options.format or "litgpt"


def out_dir(run: LoraRun, out: PathLike | None, options: MergeOptions) -> Path:
    """Where a LitGPT merge writes: `out`, else the run folder (`lit_model.pth` beside the LoRA, LitGPT's place)."""
    if out is None and output_format(options) != "litgpt":
        raise InputError(f"--format {output_format(options)} needs an output "
                         f"{'file (-o OUT.gguf)' if output_format(options) == 'gguf' else 'folder (-o)'}")
    return run.path.absolute() if out is None else Path(out).absolute()


def destination(run: LoraRun, base: HFModel, folder: Path, options: MergeOptions) -> Path:
    """What the merge replaces: `lit_model.pth` in the run folder, or the output folder. Refuses a destination
    that would overwrite an input or, without `overwrite`, a result."""
    if output_format(options) == "litgpt" and folder.exists() and folder.samefile(run.path):
        if (folder / MODEL_FILE).exists() and not options.overwrite:
            raise InputError(f"{folder / MODEL_FILE}: exists (merged before?); pass --overwrite to replace it")
        return folder / MODEL_FILE
    for path, what in ((run.path, "the LoRA run"), (base.path, "the base checkpoint")):
        if folder.exists() and folder.samefile(path):
            raise InputError(f"{folder}: the output folder is {what}; choose another -o folder")
    gguf = output_format(options) == "gguf"
    if gguf and not folder.name.endswith(GGUFFile.suffix):
        raise InputError(f"{folder}: --format gguf writes one file; name it OUT.gguf")
    check_destination(folder, options.overwrite, single_file=gguf)
    return folder


def plan(run: LoraRun, base: HFModel, folder: Path, options: MergeOptions) -> Plan:
    """Plan merging a LoRA run into `base`, written as `lit_model.pth` (format litgpt), a Hugging Face folder, or
    a GGUF (as llama.cpp converts the Hugging Face folder).

    The merged dtype is `litgpt merge_lora`'s, the LoRA weights' one, unless `--dtype` is given (for a GGUF,
    `--dtype` picks its dense type instead); LoRA updates are computed and added in it, as LitGPT does.
    `--quantize` (format hf or gguf) writes linear weights in bitsandbytes' format or a GGUF preset;
    `--trained-on` merges into the base as QLoRA training saw it (each LitGPT linear weight, the fused qkv
    whole, through bitsandbytes 4-bit, before a Hugging Face layout splits it), with double quantization as the
    run's `quantize` says (`bnb.nf4-dq`) unless `--double-quant` is given.
    """
    fmt = output_format(options)
    if options.quantize is not None and fmt == "litgpt":
        raise InputError("--quantize needs --format hf or gguf: lit_model.pth holds dense weights only")
    gguf = fmt == "gguf"
    if gguf:
        check_types(options.dtype, options.quantize)
    chosen = None if gguf else FLOAT_DTYPES.get(options.dtype or "")
    merged = chosen or lora_dtype(run)
    # LitGPT's `--quantize bnb.nf4` quantizes without double quantization, `bnb.nf4-dq` with it
    trained_dq = (options.double_quant if options.double_quant is not None
                  else str(run.hyperparameters.get("quantize")).endswith("-dq"))
    trained_on = encoding_for(options.trained_on, trained_dq, merged, "--trained-on")
    adapter = read_litgpt_adapter(run, merged)
    if fmt == "litgpt":
        view = dataclasses.replace(litgpt_view(base, adapter, merged, trained_on),  # type: ignore[arg-type]
                                   companion_files=run.companions(base))
    else:
        view, adapter = hf_view(base, adapter, merged, run.companions(base), trained_on)
    output = ({"arrange": GGUFArranger(view, options.dtype, options.quantize), "single_file": STAGED_NAME} if gguf
              else {"quantize": encoding_for(options.quantize, options.double_quant, merged)})
    job = make_plan(view, [(adapter, 1.0)], folder,
                    budget=parse_size(options.max_memory) if options.max_memory is not None else default_budget(),
                    baseline=current_rss, disk_free=disk_free(folder),
                    max_shard_size=parse_size(options.max_shard_size), dtype=merged, **output)
    if fmt != "litgpt":
        return job
    shard = Shard(MODEL_FILE, job.tensors)
    return dataclasses.replace(job, shards=(shard,), disk_needed=shard.nbytes + HEADER_ALLOWANCE)


def output(run: LoraRun, base: HFModel, job: Plan, options: MergeOptions, target: Path) -> Output:
    """The plan as an output, with its provenance and job id."""
    recorded = {"format": output_format(options), "dtype": options.dtype, "max_shard_size": job.max_shard_size,
                "quantize": options.quantize, "trained_on": options.trained_on,
                "double_quant": options.double_quant}
    record = provenance(job, {**recorded, "max_memory": job.memory.budget})
    inputs = [*base.weight_files, *run.companions(base),
              *(p for p in run.path.iterdir() if p.is_file() and p.name != MODEL_FILE and p.name[0] != '.')]
    return Output(job, writer(output_format(options), job), record, job_id(inputs, recorded, __version__), target)

