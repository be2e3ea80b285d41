"""The command line: parse options, call the API, render the result. Exit statuses are in the README."""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from . import api
from .errors import LorastreamError
from .formats.litgpt import is_lora_run
from .formats.tensor_ref import TensorRef
from .memory import format_size
from .planner import Plan, describe_shortfall

DTYPE_CHOICE = click.Choice(sorted(api.DTYPES))
IO_ERROR = 5


def _reports_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn lorastream's errors into one line on stderr and their exit status, no traceback."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except LorastreamError as exc:
            click.echo(f"lorastream: error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except OSError as exc:  # the system failed us (I/O error, permissions): the input was fine
            where = f"{exc.filename}: " if exc.filename else ""
            click.echo(f"lorastream: error: {where}{exc.strerror or exc}; the output folder is untouched",
                       err=True)
            sys.exit(IO_ERROR)
        except KeyboardInterrupt:
            click.echo("lorastream: interrupted; the output folder is untouched, and rerunning the same command "
                       "resumes from the shards already finished", err=True)
            sys.exit(130)

    return wrapper


def _parse_weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected comma-separated numbers such as 0.7,0.3") from None


_job_options = [
    click.argument("base", type=click.Path(file_okay=False)),
    click.argument("adapters", nargs=-1, required=True, type=click.Path(file_okay=False)),
    click.option("-o", "--out", required=True, type=click.Path(), help="Output folder."),
    click.option("--weights", help="Comma-separated weight per adapter (default 1 each)."),
    click.option("--max-memory", help="Peak RSS budget for the whole process, e.g. 512MiB, 2GiB, 4GB "
                 "(default: half the available memory, at most 4 GiB)."),
    click.option("--dtype", type=DTYPE_CHOICE, help="Output dtype of floating tensors (default: as in the base)."),
    click.option("--max-shard-size", default="5GB", show_default=True, help="Largest output shard."),
    click.option("--quantize", type=click.Choice(["nf4", "fp4", "int8"]),
                 help="Write linear weights in bitsandbytes' format (transformers loads it as is)."),
    click.option("--trained-on", type=click.Choice(["nf4", "fp4"]),
                 help="Merge into the base as QLoRA training saw it, dequantize(quantize(W)), not the dense weights."),
    click.option("--double-quant/--no-double-quant", default=None,
                 help="4-bit: quantize the block statistics too (default: on for nf4, off for fp4)."),
    click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout."),
]


def _with_job_options(command: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(_job_options):
        command = option(command)
    return command


# Options of `merge` and `merge-litgpt` that take a value, so their values are not read as positional folders.
_VALUE_OPTIONS = {"-o", "--out", "--base", "--format", "--weights", "--max-memory", "--dtype", "--max-shard-size",
                  "--quantize", "--trained-on"}


class _Commands(click.Group):
    """Routes `merge LORA_RUN_DIR` (one folder, holding lit_model.pth.lora) to `merge-litgpt`."""

    def resolve_command(self, ctx: click.Context, args: list[str]) -> tuple[str | None, click.Command | None,
                                                                             list[str]]:
        if args[:1] == ["merge"]:
            positional, expects_value = [], False
            for arg in args[1:]:
                if expects_value:
                    expects_value = False
                elif arg.startswith("-"):
                    expects_value = arg in _VALUE_OPTIONS
                else:
                    positional.append(arg)
            if len(positional) == 1 and is_lora_run(Path(positional[0])):
                args = ["merge-litgpt", *args[1:]]
        return super().resolve_command(ctx, args)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lorastream")
def main() -> None:
    """Merge LoRA adapters into full models in bounded memory."""
    # SIGTERM unwinds like Ctrl-C, so the staged output is removed and nothing half-written remains.
    signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(signum)


@main.command()
@_with_job_options
@click.option("--overwrite", is_flag=True,
              help="Replace a non-empty output folder (only once the new one is complete).")
@click.option("--allow-nonfinite", is_flag=True, help="Keep NaN/Inf in merged tensors instead of refusing.")
@click.option("--verify", "verify_after", is_flag=True, help="Recompute and compare the output after writing it.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@_reports_errors
def merge(base: str, adapters: tuple[str, ...], out: str, weights: str | None, max_memory: str | None,
          dtype: str | None, max_shard_size: str, quantize: str | None, trained_on: str | None,
          double_quant: bool | None, as_json: bool, overwrite: bool, allow_nonfinite: bool, verify_after: bool,
          quiet: bool) -> None:
    """Merge ADAPTERS (PEFT LoRA folders) into BASE (a Hugging Face model folder), writing OUT."""
    with tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc="merging", file=sys.stderr,
              disable=quiet or not sys.stderr.isatty()) as bar:
        result = api.merge(base, list(adapters), out, weights=_parse_weights(weights), max_memory=max_memory,
                           dtype=dtype, max_shard_size=max_shard_size, quantize=quantize, double_quant=double_quant,
                           trained_on=trained_on, overwrite=overwrite, allow_nonfinite=allow_nonfinite,
                           progress=bar.update)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
    else:
        click.echo(f"wrote {result.out_dir} ({format_size(result.bytes_written)} in {len(result.files)} files) "
                   f"in {result.seconds:.1f} s", err=True)
    click.echo(f"Memory used: peak RSS {format_size(result.peak_rss)} of a {format_size(result.budget)} budget",
               err=True)
    if verify_after:
        report = api.verify(base, list(adapters), result.out_dir, weights=_parse_weights(weights),
                            max_memory=max_memory)
        if not report.ok:
            click.echo(_render_verify(report), err=True)
            sys.exit(4)
        click.echo(f"verified: {len(report.checks)} tensors match", err=True)


@main.command("merge-litgpt")
@click.argument("lora_dir", type=click.Path(file_okay=False))
@click.option("-o", "--out", type=click.Path(), help="Output folder (default for --format litgpt: lit_model.pth "
              "in LORA_DIR, as litgpt merge_lora writes it).")
@click.option("--format", "fmt", type=click.Choice(["litgpt", "hf"]), default="litgpt", show_default=True,
              help="lit_model.pth, or a Hugging Face safetensors folder with LitGPT's key map and a config.json.")
@click.option("--base", type=click.Path(file_okay=False),
              help="Base checkpoint folder (default: checkpoint_dir in LORA_DIR/hyperparameters.yaml).")
@click.option("--max-memory", help="Peak RSS budget for the whole process, e.g. 512MiB, 2GiB.")
@click.option("--dtype", type=DTYPE_CHOICE, help="Merged dtype (default: the LoRA weights', as LitGPT).")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest output shard (--format hf).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output (only once the new one is complete).")
@click.option("--allow-nonfinite", is_flag=True, help="Keep NaN/Inf in merged tensors instead of refusing.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@_reports_errors
def merge_litgpt(lora_dir: str, out: str | None, fmt: str, base: str | None, max_memory: str | None,
                 dtype: str | None, max_shard_size: str, overwrite: bool, allow_nonfinite: bool, as_json: bool,
                 quiet: bool) -> None:
    """Merge a `litgpt finetune lora` run (LORA_DIR: final/ or step-XXXXXX/) into its base, as litgpt merge_lora
    does, in bounded memory. `lorastream merge LORA_DIR` runs this too."""
    with tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc="merging", file=sys.stderr,
              disable=quiet or not sys.stderr.isatty()) as bar:
        result = api.merge_litgpt(lora_dir, out, base=base, max_memory=max_memory, dtype=dtype, format=fmt,
                                  max_shard_size=max_shard_size, overwrite=overwrite,
                                  allow_nonfinite=allow_nonfinite, progress=bar.update)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
    else:
        shown = result.out_dir / result.files[0] if out is None else result.out_dir
        click.echo(f"wrote {shown} ({format_size(result.bytes_written)}) in {result.seconds:.1f} s", err=True)
    click.echo(f"Memory used: peak RSS {format_size(result.peak_rss)} of a {format_size(result.budget)} budget",
               err=True)


def _plan_json(job: Plan) -> dict[str, Any]:
    return {"budget": job.memory.budget, "minimum_budget": job.memory.minimum, "baseline_rss": job.memory.baseline,
            "block_elements": job.memory.block_elements, "disk_needed": job.disk_needed, "disk_free": job.disk_free,
            "total_size": job.total_size,
            "shards": [{"file": s.filename, "bytes": s.nbytes, "tensors": len(s.tensors)} for s in job.shards],
            "targets": job.targets, "fits": describe_shortfall(job) is None}


def _render_plan(job: Plan) -> str:
    merged = sum(1 for t in job.tensors if not t.is_copy)
    lines = [
        f"base      {job.base.path} ({job.base.weight_format}, {len(job.base.tensors)} tensors)",
        *(f"adapter   {a.source} (weight {w:g}, {len(a.modules)} LoRA modules, "
          f"{len(a.replacements)} replaced tensors)" for a, w in job.adapters),
        f"input     {format_size(sum(t.source.stored_bytes for t in job.tensors))} on disk, "
        f"{format_size(sum(t.source.numel * t.source.dense_dtype.itemsize for t in job.tensors))} decoded"
        + (f", {sum(not isinstance(t.source, TensorRef) for t in job.tensors)} quantized weights"
           if any(not isinstance(t.source, TensorRef) for t in job.tensors) else ""),
        f"output    {job.out_dir}: {format_size(job.total_size)}, {len(job.tensors)} tensors "
        f"({merged} computed, {len(job.tensors) - merged} copied)",
        f"memory    budget {format_size(job.memory.budget)}, minimum {format_size(job.memory.minimum)} "
        f"(baseline {format_size(job.memory.baseline)}, adapter tensors {format_size(job.memory.adapter_peak)}, "
        f"row blocks of up to {job.memory.block_elements:,} elements)",
        f"disk      needs {format_size(job.disk_needed)}, {format_size(job.disk_free)} free",
        "shards",
        *(f"  {s.filename}  {format_size(s.nbytes)}  {len(s.tensors)} tensors" for s in job.shards),
        "targets",
        *(f"  {name}  <-  {', '.join(sources)}" for name, sources in job.targets.items()),
    ]
    return "\n".join(lines)


def _render_verify(report: api.VerifyReport) -> str:
    lines = [f"{'tensor':60} {'dtype':9} {'elements':>11} {'differ':>9} {'max |diff|':>11}"]
    for check in report.checks:
        status = check.problem or ("ok" if check.ok else "MISMATCH")
        lines.append(f"{check.name:60} {check.dtype:9} {check.elements:>11,} {check.differing:>9,} "
                     f"{check.max_abs_diff:>11.3g}  {status}")
    lines += [f"unexpected tensor in the merged checkpoint: {name}" for name in report.unexpected]
    bad = sum(not c.ok for c in report.checks) + len(report.unexpected)
    lines.append("all tensors match" if report.ok else f"{bad} tensors do not match")
    return "\n".join(lines)


@main.command()
@click.argument("base", type=click.Path(file_okay=False))
@click.argument("paths", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--weights", help="Comma-separated weight per adapter (default: as recorded, else 1 each).")
@click.option("--max-memory", help="Peak RSS budget, as for merge.")
@click.option("--exact/--tolerant", default=None,
              help="Require identical bytes (default for lorastream's outputs) or allow one rounding step.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="Only the summary line and failures.")
@_reports_errors
def verify(base: str, paths: tuple[str, ...], weights: str | None, max_memory: str | None, exact: bool | None,
           as_json: bool, quiet: bool) -> None:
    """Recompute merging ADAPTERS into BASE and compare with MERGED (the last path). Exit 0 when every
    tensor matches, 4 otherwise."""
    if len(paths) < 2:
        raise click.UsageError("expected BASE ADAPTER... MERGED")
    report = api.verify(base, list(paths[:-1]), paths[-1], weights=_parse_weights(weights), max_memory=max_memory,
                        exact=exact)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        text = _render_verify(report)
        click.echo("\n".join(line for line in text.splitlines() if not quiet or "ok" not in line.split()[-1:]))
    click.echo(f"Memory used: peak RSS {format_size(report.peak_rss)} of a {format_size(report.budget)} budget",
               err=True)
    sys.exit(0 if report.ok else 4)


@main.command("plan")
@_with_job_options
@_reports_errors
def plan_command(base: str, adapters: tuple[str, ...], out: str, weights: str | None, max_memory: str | None,
                 dtype: str | None, max_shard_size: str, quantize: str | None, trained_on: str | None,
                 double_quant: bool | None, as_json: bool) -> None:
    """Show what merging ADAPTERS into BASE needs (memory, disk, shards, targets) without reading weights."""
    job = api.plan(base, list(adapters), out, weights=_parse_weights(weights), max_memory=max_memory, dtype=dtype,
                   max_shard_size=max_shard_size, quantize=quantize, double_quant=double_quant, trained_on=trained_on)
    click.echo(json.dumps(_plan_json(job), indent=2) if as_json else _render_plan(job))
    shortfall = describe_shortfall(job)
    if shortfall:
        click.echo(f"lorastream: cannot run: {shortfall}", err=True)
        sys.exit(3)


@main.command()
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--tensors", "show_tensors", is_flag=True, help="List every tensor.")
@_reports_errors
def inspect(path: str, as_json: bool, show_tensors: bool) -> None:
    """Describe a model folder, adapter folder or weight file from its headers."""
    info = api.inspect(path)
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    tensor_list = info.pop("tensor_list", [])
    modules = info.pop("modules", None)
    for key, value in info.items():
        if value not in (None, {}, []):
            shown = format_size(value) if "bytes" in key and isinstance(value, int) else value
            click.echo(f"{key:16} {shown}")
    if modules:
        click.echo("modules")
        for name, spec in modules.items():
            flags = [k for k in ("embedding", "dora", "lora_bias") if spec[k]]
            click.echo(f"  {name}  r={spec['rank']} scale={spec['scale']:g}{' ' + ','.join(flags) if flags else ''}")
    if show_tensors:
        for t in tensor_list:
            click.echo(f"  {t['name']}  {t['dtype']}  {t['shape']}")


@main.command()
@click.option("--max-memory", default="400MiB", show_default=True, help="Budget for the demo merge.")
@click.option("--keep", type=click.Path(file_okay=False), help="Build in this folder and keep it.")
@_reports_errors
def demo(max_memory: str, keep: str | None) -> None:
    """Build a small random Llama-style model and PEFT adapter, merge them, check against PEFT."""
    from .demo import run_demo

    sys.exit(run_demo(max_memory, keep, echo=lambda line: click.echo(line, err=True)))
