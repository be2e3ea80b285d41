"""The Hugging Face family: a model folder (local or remote) and PEFT adapter folders, merged into one output
(`plan`) or each into its own output in one pass over the base (`plan_each`)."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..adapters.lora import Adapter
from ..adapters.peft import read_peft_adapter
from ..codecs import encoding_for
from ..device import Accelerator, accelerator
from ..dtypes import FLOAT_DTYPES, config_dtype
from ..errors import InputError
from ..formats.hf import HFModel, open_hf_model, read_json
from ..io.locations import Location, disk_free, io_buffer_bytes, is_remote, location
from ..io.staging import job_id
from ..memory import current_rss, default_budget, parse_size
from ..options import MergeOptions
from ..outputs import writer
from ..outputs.base import Output, check_destination, provenance
from ..outputs.gguf import STAGED_NAME, GGUFArranger, GGUFFile, check_types
from ..planner import MAX_BLOCK_ELEMENTS, Plan, make_plans
from ..version import __version__
from .targets import Layout, checkpoint_layout, named_on_disk

PathLike = str | os.PathLike[str]


def adapter_paths(adapters: PathLike | Sequence[PathLike]) -> list[PathLike]:
    return [adapters] if isinstance(adapters, str | os.PathLike) else list(adapters)


def gpu(options: MergeOptions) -> Accelerator | None:
    """The accelerator `options.device` names (an `Accelerator` is taken as given: tests pass the CPU as one)."""
    if isinstance(options.device, Accelerator):
        return options.device
    return accelerator(options.device, options.max_gpu_memory)


# A Hub repo id as transformers and PEFT take one: `org/name` (letters, digits, `-`, `_`, `.`).
_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")


def resolve_base(base: PathLike | None, adapters: Sequence[PathLike], revision: str | None = None) -> Location:
    """Where the base model is: a folder or URL as given; a Hub repo id (`org/name`) through the local Hugging
    Face cache, as `from_pretrained` finds it (HF_HOME, HF_HUB_CACHE, snapshots), else read from the Hub (hf://)
    unless HF_HUB_OFFLINE is set; none at all: the first adapter's `base_model_name_or_path`."""
    if base is None:
        config = read_json(location(adapters[0]) / "adapter_config.json") if adapters else {}
        recorded = config.get("base_model_name_or_path") if isinstance(config, dict) else None
        if not isinstance(recorded, str) or not recorded:
            raise InputError(f"{adapters[0] if adapters else 'ADAPTER'}: its adapter_config.json records no "
                             "base_model_name_or_path; name the base: lorastream merge BASE ADAPTER -o OUT")
        base = recorded
    given = location(base)
    if is_remote(given) or given.exists() or not _REPO_ID.fullmatch(str(base)):
        if revision is not None:
            raise InputError(f"--revision {revision}: {base} is a folder, not a Hub repo id")
        return given
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.utils import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(base), revision=revision, local_files_only=True))
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            raise InputError(f"{base}{'@' + revision if revision else ''}: not a folder, and not in the Hugging Face "
                             f"cache ({constants.HF_HUB_CACHE}) while HF_HUB_OFFLINE is set; download it first "
                             "(hf download) or name a local folder") from None
    return location(f"hf://{base}" + (f"@{revision}" if revision else ""))


def each_destinations(adapters: Sequence[PathLike], out: PathLike, suffix: str = "") -> list[Location]:
    """`out/<adapter folder name><suffix>` for every adapter (`.gguf` for GGUF files); two adapters with the same
    folder name are refused."""
    if not adapters:
        raise InputError("--each: no adapter given")
    names = [location(a).name for a in adapters]
    for name in names:
        if names.count(name) > 1:
            same = [str(a) for a, n in zip(adapters, names, strict=True) if n == name]
            raise InputError(f"--each: adapters {', '.join(same)} share the folder name {name!r}, which names their "
                             "output folder; rename or link one of them")
    return [(location(out) / f"{name}{suffix}").absolute() for name in names]


def _adapters(paths: list[PathLike], weights: Sequence[float] | None,
              layout: Layout | None) -> list[tuple[Adapter, float]]:
    if not paths:
        raise InputError("no adapter given")
    weights = list(weights) if weights is not None else [1.0] * len(paths)
    if len(weights) != len(paths):
        raise InputError(f"--weights has {len(weights)} values for {len(paths)} adapters")
    resolver = layout.parameter_target if layout is not None else None
    return [(read_peft_adapter(location(p), resolver), float(w)) for p, w in zip(paths, weights, strict=True)]


def _on_disk(model: HFModel, jobs: list[tuple[list[PathLike], Sequence[float] | None]],
             quantizing: bool) -> Layout | None:
    """transformers' map of the model's in-memory tensors to the checkpoint's, when an adapter needs it (it targets
    `nn.Parameter`s, or names a tensor the checkpoint does not hold under that name), or when `quantizing` (which
    tensors bitsandbytes quantizes depends on what they are in memory); see inputs/targets.py. transformers is
    imported only then."""
    adapters = [read_peft_adapter(location(p)) for paths, _ in jobs for p in paths]
    needed = any(a.unresolved or not named_on_disk(model, a, replacements=False) for a in adapters)
    if not needed and not quantizing and all(named_on_disk(model, a) for a in adapters):
        return None
    try:
        return checkpoint_layout(model)
    except InputError:
        if needed:
            raise
        return None  # only a new whole tensor (a head), or quantizing a model class transformers lacks


def plan_pass(base: PathLike, jobs: list[tuple[list[PathLike], Sequence[float] | None]], out_dirs: list[Location],
              options: MergeOptions, gpu: Accelerator | None) -> list[Plan]:
    """Plans of one pass over `base`: each job (adapters, weights) merged into its output folder."""
    model = open_hf_model(location(base))
    if options.format == "gguf":
        for out_dir in out_dirs:
            if not out_dir.name.endswith(GGUFFile.suffix):
                raise InputError(f"{out_dir}: --format gguf writes one file; name it OUT.gguf")
        check_types(options.dtype, options.quantize)
        gguf: dict[str, Any] = {"arrange": GGUFArranger(model, options.dtype, options.quantize),
                                "single_file": STAGED_NAME}
    chosen = FLOAT_DTYPES.get(options.dtype or "")
    shard_bytes = parse_size(options.max_shard_size)
    remote_inputs = [model.path, *(location(a) for paths, _ in jobs for a in paths)]
    # a GGUF is one file: its upload's part size follows its size (at most 4 bytes per element)
    largest = shard_bytes if options.format != "gguf" else 4 * sum(math.prod(s.shape) for s in model.sources.values())
    io_buffers = sum(io_buffer_bytes(remote_inputs if k == 0 else [], out_dir, largest, 4 * MAX_BLOCK_ELEMENTS)
                     for k, out_dir in enumerate(out_dirs))
    compute = chosen or config_dtype(model.config, torch.bfloat16)
    # before the baseline is measured: it may import transformers
    bitsandbytes = (options.quantize is not None and options.format != "gguf") or options.trained_on is not None
    layout = _on_disk(model, jobs, bitsandbytes)
    adapters = [_adapters(paths, weights, layout) for paths, weights in jobs]
    # GGUF: the merged values are rounded to the base's dtype (as PEFT's merged folder), then to the GGUF types
    output = gguf if options.format == "gguf" else {
        "dtype": chosen, "quantize": encoding_for(options.quantize, options.double_quant, compute)}
    return make_plans(model, adapters, out_dirs,  # type: ignore[arg-type]
                      budget=parse_size(options.max_memory) if options.max_memory is not None else default_budget(),
                      baseline=current_rss, disk_free=disk_free(out_dirs[0]), max_shard_size=shard_bytes,
                      trained_on=encoding_for(options.trained_on, options.double_quant,  # type: ignore[arg-type]
                                              config_dtype(model.config, torch.bfloat16), "--trained-on"),
                      io_buffers=io_buffers, gpu_budget=gpu.budget if gpu is not None else 0,
                      gpu_libraries=gpu.libraries if gpu is not None else 0, on_disk=layout,
                      **output)  # type: ignore[arg-type]


def plan(base: PathLike | None, adapters: PathLike | Sequence[PathLike], out: PathLike, options: MergeOptions) -> Plan:
    """The plan of merging `adapters` (with `options.weights`) into `base`, written to `out`."""
    paths = adapter_paths(adapters)
    return plan_pass(resolve_base(base, paths, options.revision), [(paths, options.weights)],
                     [location(out).absolute()], options, gpu(options))[0]


def plan_each(base: PathLike | None, adapters: Sequence[PathLike], out: PathLike, options: MergeOptions) -> list[Plan]:
    """The plans of merging each adapter on its own into `out/<adapter folder name>/`, in one pass."""
    return plan_pass(resolve_base(base, adapters, options.revision), [([a], None) for a in adapters],
                     each_destinations(adapters, out, suffix(options)), options, gpu(options))


def suffix(options: MergeOptions) -> str:
    """What ends each output's name under `merge --each`: `.gguf` for GGUF files, nothing for folders."""
    return getattr(writer(options.format or "hf"), "suffix", "")


def check_output(base: PathLike, adapters: Sequence[PathLike], out_dir: Location, overwrite: bool,
                 single_file: bool = False) -> None:
    """Refuse an output folder that is one of the inputs, or holds something not to be replaced."""
    for path in [location(base), *(location(a) for a in adapters)]:
        if is_remote(path) == is_remote(out_dir) and path.exists() and out_dir.exists() and out_dir.samefile(path):
            raise InputError(f"{out_dir}: the output folder is one of the inputs; choose another -o folder")
    check_destination(out_dir, overwrite, single_file)


def identity(job: Plan, options: MergeOptions, gpu: Accelerator | None) -> tuple[dict[str, Any], str]:
    """What an output records about how it was made (its provenance), and the job id its staging folder is
    resumed by: the same for a merge on its own and the same merge within `merge_each`. A GPU merge records
    its device: its bytes may differ from the CPU's by rounding, so `verify` then compares with tolerance."""
    recorded: dict[str, Any] = {"dtype": options.dtype, "max_shard_size": job.max_shard_size,
                                "quantize": options.quantize, "trained_on": options.trained_on,
                                "double_quant": options.double_quant, "weights": [w for _, w in job.adapters]}
    if gpu is not None and gpu.device.type != "cpu":
        recorded["device"] = str(gpu.device)
    record = provenance(job, {**recorded, "max_memory": job.memory.budget})
    inputs = [*job.base.weight_files, *job.base.companion_files, job.base.path / "config.json",
              *(p for a, _ in job.adapters for p in location(a.source).iterdir() if p.is_file())]
    return record, job_id(inputs, recorded, __version__)


def outputs(plans: list[Plan], options: MergeOptions, gpu: Accelerator | None) -> list[Output]:
    """Each plan as an output in `--format` (default: a Hugging Face folder)."""
    if options.format == "litgpt":
        raise InputError("--format litgpt writes lit_model.pth from a LitGPT run; a Hugging Face base is merged "
                         "into --format hf")
    return [Output(job, writer(options.format or "hf", job), *identity(job, options, gpu), job.out_dir)
            for job in plans]
