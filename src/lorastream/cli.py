"""The command line: parse options, call the API, render the result. Exit statuses are in docs/exit-statuses.md."""

from __future__ import annotations

import json
import logging
import signal
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from . import api, options
from . import batch as batch_jobs
from .codecs.plain import TensorRef
from .errors import ExitStatus, LorastreamError
from .formats.litgpt import is_lora_run
from .io.locations import is_remote
from .memory import format_size
from .options import MergeOptions
from .planner import Plan, describe, describe_shortfall
from .quiet import third_party_quiet


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
            sys.exit(ExitStatus.SYSTEM)
        except KeyboardInterrupt:
            click.echo("lorastream: interrupted; the output folder is untouched, and rerunning the same command "
                       "resumes from the shards already finished", err=True)
            sys.exit(ExitStatus.INTERRUPTED)

    return wrapper


def _click_option(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A merge option as click shows it, from its `MergeOptions` field."""
    spec, default = options.spec(name), options.default(name)
    if spec.is_flag:
        return click.option(options.flag(name), is_flag=True, help=spec.help)
    if spec.is_switch:
        return click.option(f"{options.flag(name)}/--no-{options.flag(name)[2:]}", default=None, help=spec.help)
    settings: dict[str, Any] = {"help": spec.help}
    if spec.choices:
        settings["type"] = click.Choice(spec.choices)
    if default is not None:
        settings.update(default=default, show_default=True)
    if spec.parse is not None:
        settings["callback"] = _parser(spec.parse)
    return click.option(options.flag(name), **settings)


def _parser(parse: Callable[[str], Any]) -> Callable[[click.Context, click.Parameter, str | None], Any]:
    def callback(_ctx: click.Context, _param: click.Parameter, value: str | None) -> Any:
        try:
            return None if value is None else parse(value)
        except ValueError as exc:
            raise click.BadParameter(f"{value!r}: {exc}") from None

    return callback


def _merge_options(command: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The `MergeOptions` fields `command` takes, as click options; the command gets them as keyword arguments."""
    def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
        for name in reversed(options.for_command(command)):
            function = _click_option(name)(function)
        return function

    return decorate


_JSON = click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
_QUIET = click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
_BASE = click.option("--base", type=click.Path(file_okay=False),
                     help="Base checkpoint folder (default: checkpoint_dir in LORA_DIR/hyperparameters.yaml).")
_LITGPT_OUT = click.option("-o", "--out", type=click.Path(), help="Output folder (default for --format litgpt: "
                           "lit_model.pth in LORA_DIR, as litgpt merge_lora writes it).")


def _peft_inputs(function: Callable[..., Any]) -> Callable[..., Any]:
    function = click.option("-o", "--out", required=True, type=click.Path(), help="Output folder.")(function)
    function = click.argument("adapters", nargs=-1, type=click.Path(file_okay=False))(function)
    return click.argument("base", type=click.Path(file_okay=False))(function)


def _base_and_adapters(base: str, adapters: tuple[str, ...]) -> tuple[str | None, list[str]]:
    """`BASE ADAPTER...`, or `ADAPTER` alone: its base is then the one its adapter_config.json records."""
    return (base, list(adapters)) if adapters else (None, [base])


def _value_options(command: click.Command | None) -> set[str]:
    """The options of `command` that take a value (so that value is not read as a positional argument)."""
    return {name for p in (command.params if command else []) if isinstance(p, click.Option) and not p.is_flag
            for name in p.opts}


# The LitGPT form of a command, and how many positional arguments it takes (the first being the LoRA run).
_LITGPT_FORMS = {"merge": ("merge-litgpt", 1), "plan": ("plan-litgpt", 1), "verify": ("verify-litgpt", 2)}


class _Commands(click.Group):
    """Routes `merge LORA_RUN_DIR`, `plan LORA_RUN_DIR` and `verify LORA_RUN_DIR MERGED` (a run folder holds
    lit_model.pth.lora) to their LitGPT forms."""

    def resolve_command(self, ctx: click.Context, args: list[str]) -> tuple[str | None, click.Command | None,
                                                                             list[str]]:
        if args[:1] and args[0] in _LITGPT_FORMS:
            command, count = _LITGPT_FORMS[args[0]]
            value_options = _value_options(self.commands.get(args[0])) | _value_options(self.commands.get(command))
            positional, expects_value = [], False
            for arg in args[1:]:
                if expects_value:
                    expects_value = False
                elif arg.startswith("-"):
                    expects_value = arg in value_options
                else:
                    positional.append(arg)
            if len(positional) == count and is_lora_run(Path(positional[0])):
                args = [command, *args[1:]]
        return super().resolve_command(ctx, args)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lorastream")
@click.pass_context
def main(ctx: click.Context) -> None:
    """Merge LoRA adapters into full models in bounded memory."""
    # SIGTERM unwinds like Ctrl-C, so the staged output is removed and nothing half-written remains.
    signal.signal(signal.SIGTERM, _interrupt)
    ctx.with_resource(third_party_quiet())
    # the library's notes on how a run ran (for example which codec kernels) go to stderr, one line each; added
    # once per process (main runs once per command, many times in one process under tests or batch drivers)
    logger = logging.getLogger("lorastream")
    if _LOG_HANDLER not in logger.handlers:
        logger.addHandler(_LOG_HANDLER)
    logger.setLevel(logging.INFO)


_LOG_HANDLER = logging.StreamHandler()
_LOG_HANDLER.setFormatter(logging.Formatter("lorastream: %(message)s"))


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(signum)


@main.command()
@_peft_inputs
@_merge_options(options.MERGE)
@click.option("--each", is_flag=True, help="Merge each adapter on its own into OUT/<adapter folder name>/, "
              "reading the base once for all of them.")
@_JSON
@_QUIET
@_reports_errors
def merge(base: str, adapters: tuple[str, ...], out: str, each: bool, as_json: bool, quiet: bool,
          **fields: Any) -> None:
    """Merge ADAPTERS (PEFT LoRA folders) into BASE, writing OUT. BASE is a Hugging Face model folder, a URL, or
    a Hub repo id (org/name) found in the local Hugging Face cache as from_pretrained finds it; without BASE
    (`merge ADAPTER -o OUT`), the adapter's base_model_name_or_path."""
    chosen = MergeOptions(**fields)
    model, inputs = _base_and_adapters(base, adapters)
    _refuse_weights_with_each(each, chosen)
    if each and chosen.executor != "local":
        raise click.UsageError("--each runs on the local executor only")
    with _progress_bar(quiet) as bar:
        results = (api.merge_each(model, inputs, out, chosen, progress=bar.update) if each else
                   [api.merge(model, inputs, out, chosen, progress=bar.update)])
    if as_json:
        click.echo(json.dumps([r.to_json() for r in results] if each else results[0].to_json(), indent=2))
    else:
        for result in results:
            click.echo(f"{result.out_dir}: already up to date (written by this same merge: inputs and options)"
                       if result.up_to_date else f"wrote {result.out_dir} ({format_size(result.bytes_written)} in "
                       f"{len(result.files)} files) in {result.seconds:.1f} s; {_changed(result.changed)}", err=True)
    click.echo(f"Memory used: peak RSS {format_size(results[0].peak_rss)} of a {format_size(results[0].budget)} "
               "budget", err=True)
    if chosen.verify:
        merged = [[a] for a in inputs] if each else [inputs]
        for adapter_set, result in zip(merged, results, strict=True):
            report = api.verify(model, adapter_set, result.out_dir, weights=chosen.weights,
                                max_memory=chosen.max_memory, revision=chosen.revision)
            if not report.ok:
                click.echo(_render_verify(report), err=True)
                sys.exit(ExitStatus.MISMATCH)
            click.echo(f"verified: {len(report.checks)} tensors match in {result.out_dir}", err=True)


def _progress_bar(quiet: bool) -> tqdm[Any]:
    return tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc="merging", file=sys.stderr,
                disable=quiet or not sys.stderr.isatty())


@main.command("merge-litgpt")
@click.argument("lora_dir", type=click.Path(file_okay=False))
@_LITGPT_OUT
@_BASE
@_merge_options(options.MERGE_LITGPT)
@_JSON
@_QUIET
@_reports_errors
def merge_litgpt(lora_dir: str, out: str | None, base: str | None, as_json: bool, quiet: bool, **fields: Any) -> None:
    """Merge a `litgpt finetune lora` run (LORA_DIR: final/ or step-XXXXXX/) into its base, as litgpt merge_lora
    does, in bounded memory. `lorastream merge LORA_DIR` runs this too."""
    with _progress_bar(quiet) as bar:
        result = api.merge_litgpt(lora_dir, out, MergeOptions(**fields), base=base, progress=bar.update)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
    else:
        shown = result.out_dir / result.files[0] if out is None else result.out_dir
        click.echo(f"{shown}: already up to date (written by this same merge: inputs and options)"
                   if result.up_to_date else f"wrote {shown} ({format_size(result.bytes_written)}) in "
                   f"{result.seconds:.1f} s; {_changed(result.changed)}", err=True)
    click.echo(f"Memory used: peak RSS {format_size(result.peak_rss)} of a {format_size(result.budget)} budget",
               err=True)


def _changed(counts: dict[str, int]) -> str:
    """`changed 7 tensors: 4 language model, 3 experts` (what the adapters changed, per model component)."""
    total = sum(counts.values())
    return f"changed {total} tensors" + (": " + ", ".join(f"{n} {part}" for part, n in counts.items()) if total else "")


def _plan_json(job: Plan) -> dict[str, Any]:
    return {"budget": job.memory.budget, "minimum_budget": job.memory.minimum, "baseline_rss": job.memory.baseline,
            "block_elements": job.memory.block_elements, "bytes_per_element": job.memory.bytes_per_element,
            "buffers": dict(job.memory.in_flight), "io_buffers": job.memory.io_buffers,
            "disk_needed": job.disk_needed, "disk_free": None if is_remote(job.out_dir) else job.disk_free,
            "total_size": job.total_size,
            "shards": [{"file": s.filename, "bytes": s.nbytes, "tensors": len(s.tensors)} for s in job.shards],
            "targets": job.targets, "changed": job.changed, "fits": describe_shortfall(job) is None,
            **({"gpu": {"budget": job.memory.gpu_budget, "minimum_budget": job.memory.gpu_minimum,
                        "adapter_peak": job.memory.gpu_adapter_peak, "libraries": job.memory.gpu_libraries,
                        "bytes_per_element": job.memory.gpu_bytes_per_element,
                        "buffers": dict(job.memory.gpu_in_flight)}} if job.memory.gpu_budget else {})}


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
        f"changes   {_changed(job.changed)}",
        f"memory    budget {format_size(job.memory.budget)}, minimum {format_size(job.memory.minimum)} "
        f"(baseline {format_size(job.memory.baseline)}, adapter tensors {format_size(job.memory.adapter_peak)}, "
        + (f"remote I/O buffers {format_size(job.memory.io_buffers)}, " if job.memory.io_buffers else "")
        + f"row blocks of up to {job.memory.block_elements:,} elements)",
        f"buffers   per row-block element {job.memory.bytes_per_element} B: {job.memory.describe_buffers()}",
        *([f"gpu       budget {format_size(job.memory.gpu_budget)}, minimum {format_size(job.memory.gpu_minimum)} "
           f"(cuBLAS workspace {format_size(job.memory.gpu_libraries)}, adapter tensors "
           f"{format_size(job.memory.gpu_adapter_peak)}, per row-block element "
           f"{job.memory.gpu_bytes_per_element} B: {describe(job.memory.gpu_in_flight)})"]
          if job.memory.gpu_budget else []),
        f"disk      needs {format_size(job.disk_needed)}, "
        + ("in an object store (no free-space limit)" if is_remote(job.out_dir) else
           f"{format_size(job.disk_free)} free"),
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
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@_merge_options(options.VERIFY)
@click.option("--exact/--tolerant", default=None,
              help="Require identical bytes (default for lorastream's outputs) or allow one rounding step.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="Only the summary line and failures.")
@_reports_errors
def verify(base: str, paths: tuple[str, ...], exact: bool | None, as_json: bool, quiet: bool, **fields: Any) -> None:
    """Recompute merging ADAPTERS into BASE and compare with MERGED (the last path: a folder, or a .gguf file,
    recomputed with the types its file type names). Exit 0 when every tensor matches, 4 otherwise."""
    if len(paths) < 2:
        raise click.UsageError("expected BASE ADAPTER... MERGED")
    report = api.verify(base, list(paths[:-1]), paths[-1], MergeOptions(**fields), exact=exact)
    _show_verify(report, as_json, quiet)


def _show_verify(report: api.VerifyReport, as_json: bool, quiet: bool) -> None:
    """Print the report and exit: 0 when every tensor matches, 4 otherwise."""
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        text = _render_verify(report)
        click.echo("\n".join(line for line in text.splitlines() if not quiet or "ok" not in line.split()[-1:]))
    click.echo(f"Memory used: peak RSS {format_size(report.peak_rss)} of a {format_size(report.budget)} budget",
               err=True)
    sys.exit(ExitStatus.OK if report.ok else ExitStatus.MISMATCH)


@main.command("verify-litgpt")
@click.argument("lora_dir", type=click.Path(file_okay=False))
@click.argument("merged", type=click.Path(exists=True))
@_BASE
@_merge_options(options.VERIFY_LITGPT)
@click.option("--exact/--tolerant", default=True, show_default=True,
              help="Require identical bytes (lorastream and litgpt merge_lora write the same) or allow one rounding "
              "step.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="Only the summary line and failures.")
@_reports_errors
def verify_litgpt(lora_dir: str, merged: str, base: str | None, exact: bool, as_json: bool, quiet: bool,
                  **fields: Any) -> None:
    """Recompute merging the LitGPT LoRA run LORA_DIR and compare with MERGED: a lit_model.pth (or its folder),
    or a --format hf folder. Exit 0 when every tensor matches, 4 otherwise. `lorastream verify LORA_DIR MERGED`
    runs this too."""
    report = api.verify_litgpt(lora_dir, merged, MergeOptions(**fields), base=base, exact=exact)
    _show_verify(report, as_json, quiet)


@main.command("plan")
@_peft_inputs
@_merge_options(options.PLAN)
@click.option("--each", is_flag=True, help="Plan merging each adapter on its own into OUT/<adapter folder name>/, "
              "in one pass over the base.")
@_JSON
@_reports_errors
def plan_command(base: str, adapters: tuple[str, ...], out: str, each: bool, as_json: bool, **fields: Any) -> None:
    """Show what merging ADAPTERS into BASE needs (memory, disk, shards, targets) without reading weights."""
    chosen = MergeOptions(**fields)
    _refuse_weights_with_each(each, chosen)
    model, inputs = _base_and_adapters(base, adapters)
    jobs = api.plan_each(model, inputs, out, chosen) if each else [api.plan(model, inputs, out, chosen)]
    _show_plan(jobs[0], as_json, *jobs[1:])


def _refuse_weights_with_each(each: bool, chosen: MergeOptions) -> None:
    if each and chosen.weights is not None:
        raise click.UsageError("--weights combines the adapters into one model, --each merges each one on its own "
                               "into OUT/<adapter folder name>/; use one or the other")


def _show_plan(job: Plan, as_json: bool, *others: Plan) -> None:
    """Print the plan, and the others of its pass (`plan --each`); exit 3 when they cannot run."""
    jobs = [job, *others]
    if as_json:
        click.echo(json.dumps([_plan_json(j) for j in jobs] if others else _plan_json(job), indent=2))
    else:
        click.echo("\n\n".join(_render_plan(j) for j in jobs))
    shortfall = describe_shortfall(job, *others)
    if shortfall:
        click.echo(f"lorastream: cannot run: {shortfall}", err=True)
        sys.exit(ExitStatus.RESOURCES)


@main.command("plan-litgpt")
@click.argument("lora_dir", type=click.Path(file_okay=False))
@_LITGPT_OUT
@_BASE
@_merge_options(options.PLAN_LITGPT)
@_JSON
@_reports_errors
def plan_litgpt(lora_dir: str, out: str | None, base: str | None, as_json: bool, **fields: Any) -> None:
    """Show what merging the LitGPT LoRA run LORA_DIR needs (memory, disk, output layout) without reading weights.
    `lorastream plan LORA_DIR` runs this too."""
    _show_plan(api.plan_litgpt(lora_dir, out, MergeOptions(**fields), base=base), as_json)


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


@main.command("extract")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(), help="Output adapter folder.")
@click.option("--format", "fmt", type=click.Choice(["litgpt", "peft"]),
              help="lit_model.pth.lora + hyperparameters.yaml, or adapter_model.safetensors + adapter_config.json "
              "(default: the checkpoint's own).")
@click.option("--lora-alpha", type=float, help="LoRA alpha, which the tensors do not record (default: the config's).")
@click.option("--config", type=click.Path(dir_okay=False), help="adapter_config.json (PEFT) or hyperparameters.yaml "
              "(LitGPT) for what the tensors do not record (default: the one beside CHECKPOINT, if any).")
@click.option("--base", help="The base model: PEFT's base_model_name_or_path; LitGPT's checkpoint_dir (also where "
              "model_config.yaml and tokenizer files are taken from).")
@click.option("--adapter-name", default="default", show_default=True, help="PEFT: which adapter of the model.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder (once the new one is complete).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
@_reports_errors
def extract_command(checkpoint: str, out: str, fmt: str | None, lora_alpha: float | None, config: str | None,
                    base: str | None, adapter_name: str, overwrite: bool, as_json: bool) -> None:
    """Write only the adapter held in CHECKPOINT, a whole LitGPT LoRA or PEFT model's state dict (torch zip or
    safetensors), as an adapter folder; the base weights are not read."""
    result = api.extract(checkpoint, out, format=fmt, lora_alpha=lora_alpha, config=config, base=base,
                         adapter_name=adapter_name, overwrite=overwrite)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
    else:
        click.echo(f"wrote {result.out_dir} ({result.format} adapter: {result.tensors} tensors, "
                   f"{format_size(result.bytes_written)}) in {result.seconds:.1f} s", err=True)


def _render_batch(outcomes: list[batch_jobs.Outcome]) -> str:
    lines = [f"{'job':>4}  {'status':8} {'seconds':>8} {'written':>10}  output"]
    for o in outcomes:
        written = format_size(o.bytes_written) if o.status == "ok" else ""
        lines.append(f"{o.job.index:>4}  {o.status:8} {o.seconds:>8.1f} {written:>10}  {o.job.out}")
        if o.error:
            lines.append(f"{'':34}  {o.status}: {o.error}")
    done = sum(o.status == "ok" for o in outcomes)
    lines.append(f"{done} of {len(outcomes)} jobs succeeded")
    return "\n".join(lines)


@main.command()
@click.argument("jobs_file", metavar="JOBS.yaml", type=click.Path(dir_okay=False))
@click.option("--continue-on-error", is_flag=True, help="Run every job even after one fails (default: skip the rest).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@_click_option("executor")
@_click_option("ray_address")
@_reports_errors
def batch(jobs_file: str, continue_on_error: bool, as_json: bool, executor: str, ray_address: str | None) -> None:
    """Run the merges listed in JOBS.yaml (all checked first) and print which succeeded and why others failed.
    Exit 0 when every job succeeded, 6 when one failed."""
    jobs = batch_jobs.load_jobs(Path(jobs_file))
    outcomes = batch_jobs.run_jobs(jobs, executor=executor, continue_on_error=continue_on_error,
                                   ray_address=ray_address,
                                   report=lambda o: click.echo(f"job {o.job.index}: {o.status} {o.job.out}", err=True))
    if as_json:
        click.echo(json.dumps({"jobs": [o.to_json() for o in outcomes],
                               "succeeded": sum(o.status == "ok" for o in outcomes), "total": len(outcomes)}, indent=2))
    else:
        click.echo(_render_batch(outcomes))
    sys.exit(ExitStatus.OK if all(o.status == "ok" for o in outcomes) else ExitStatus.JOBS_FAILED)


@main.command()
@click.option("--max-memory", default="400MiB", show_default=True, help="Budget for the demo merge.")
@click.option("--keep", type=click.Path(file_okay=False), help="Build in this folder and keep it.")
@_reports_errors
def demo(max_memory: str, keep: str | None) -> None:
    """Build a small random Llama-style model and PEFT adapter, merge them, check against PEFT."""
    from .demo import run_demo

    sys.exit(run_demo(max_memory, keep, echo=lambda line: click.echo(line, err=True)))
