"""Where an adapter's targets are on disk: transformers' own checkpoint conversions, read backwards.

transformers 5 names and shapes some modules in memory unlike the checkpoint `save_pretrained` writes: a
vision-language model keeps its language model at `model.language_model.layers...` in memory and at
`model.layers...` or `language_model.model.layers...` on disk; a Mixtral or Qwen3-MoE model fuses its experts
into 3-D parameters (`mlp.experts.gate_up_proj` [experts, 2·intermediate, hidden]) that are one 2-D tensor per
expert and projection on disk (`block_sparse_moe.experts.E.w1`). PEFT adapters name the in-memory modules, and
the output keeps the base's on-disk layout, so each adapter target is resolved here to the on-disk tensors (and
the part of each) that hold it.

The rules are transformers' own (`conversion_mapping.get_model_conversion_mapping`, applied to each on-disk
name as `from_pretrained` does with `core_model_loading.rename_source_key`) for the model class the config's
`architectures` names, built on the meta device: no weight is allocated. Of the conversions, renames and the
expert fusion (`MergeModulelist(dim=0)`, then `Concatenate(dim=1)`) are inverted; a tensor made by any other
operation is listed as unsupported, and a merge that targets it is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import multiprocessing
import os
import re
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..adapters.lora import Adapter, ParameterTarget
from ..cache import cache_root
from ..errors import InputError
from ..formats.hf import HFModel
from ..planner import Piece


@dataclass(frozen=True)
class Layout:
    """The model's in-memory tensors and the on-disk pieces each is loaded from."""

    pieces: dict[str, tuple[Piece, ...]]
    shapes: dict[str, tuple[int, ...]]
    unsupported: dict[str, str] = field(default_factory=dict)
    parameters: dict[str, list[str]] = field(default_factory=dict)  # module -> its own parameters, in order
    transposed: frozenset[str] = frozenset()
    # a tied head (no tensor of its own on disk) -> (the on-disk tensor it shares, the name it is saved under alone)
    tied: dict[str, tuple[str, str]] = field(default_factory=dict)
    linear: frozenset[str] = frozenset()  # on-disk names of `nn.Linear` weights (what bitsandbytes quantizes)

    def parameter_target(self, wrapper: str, targets: list[str]) -> ParameterTarget | None:
        """The parameter a PEFT `ParamWrapper` at `wrapper` (`module.base_layer...`, one `.base_layer` per wrapper
        nested outside it) adapts, None when `wrapper` is an ordinary module. PEFT wraps a module's targeted
        parameters in their registration order, each new wrapper outside the others (`_inject_parameters`)."""
        depth = wrapper.count(".base_layer")
        module = wrapper.replace(".base_layer", "")
        targeted = [p for p in self.parameters.get(module, [])
                    if any(f"{module}.{p}" == t or f"{module}.{p}".endswith(f".{t}") for t in targets)]
        if depth >= len(targeted):
            return None
        name = f"{module}.{targeted[len(targeted) - 1 - depth]}"
        return ParameterTarget(name, self.shapes[name], module in self.transposed)


def named_on_disk(base: HFModel, adapter: Adapter, replacements: bool = True) -> bool:
    """Whether every tensor `adapter` changes (of its whole-tensor `replacements` too, unless told otherwise) is
    in the checkpoint under the name it uses: the common case, which needs no conversion rules (no transformers
    import)."""
    names = ([lora.weight_name for lora in adapter.modules.values()] + [f"{m}.weight" for m in adapter.token_rows]
             + (list(adapter.replacements) if replacements else []))
    return all(n in base.sources or (n.count(".") > 1 and n.split(".", 1)[1] in base.sources) for n in names)


def _without_transformers(base: HFModel) -> InputError:
    return InputError(f"{base.path}: mapping its in-memory module names to the checkpoint's tensors needs "
                      "transformers (pip install 'lorastream[reference]')")


def _meta_model(base: HFModel) -> Any:
    """The model class `architectures` names, built from config.json on the meta device."""
    try:
        import transformers
        from transformers import AutoConfig
    except ImportError:  # pragma: no cover - checkpoint_layout refuses first when transformers is not installed
        raise _without_transformers(base) from None
    architectures = base.config.get("architectures") or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    if cls is None:
        raise InputError(f"{base.path / 'config.json'}: architectures {architectures} is not a model class of "
                         f"transformers {transformers.__version__}; cannot map the adapter's module names to the "
                         "checkpoint's tensors")
    try:
        config = AutoConfig.for_model(**base.config)
        with torch.device("meta"):
            return cls(config)
    except Exception as exc:  # a model class may need anything (an optional package, a config field): one line
        raise InputError(f"{base.path / 'config.json'}: transformers cannot build {architectures[0]} from it "
                         f"({exc})") from exc


def _fusion_supported(operations: list[Any]) -> bool:
    """Whether a converter only stacks per-expert tensors (and concatenates projections): invertible row by row."""
    kinds = [(type(op).__name__, getattr(op, "dim", None)) for op in operations]
    return kinds in ([("MergeModulelist", 0)], [("MergeModulelist", 0), ("Concatenate", 1)])


def checkpoint_layout(base: HFModel) -> Layout:
    """Every in-memory tensor of `base`'s model class and the on-disk tensors it is loaded from.

    Worked out in a child process when this one has not imported transformers: its modules (about 130 MiB) would
    otherwise stay in the merge's resident memory, inside the user's budget, for the whole job. Importing
    transformers there takes seconds, a good part of a small merge, so the result is kept in the cache, keyed by
    everything it depends on: config.json, the checkpoint's tensor names and shapes, and transformers' version."""
    cached = _cache_path(base)
    if cached.is_file():
        try:
            return _layout_from_json(json.loads(cached.read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable: worked out again, and rewritten
    if "transformers" in sys.modules:
        layout = _checkpoint_layout(base)
    else:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as child:
            try:
                layout = child.submit(_checkpoint_layout, base).result()
            except BrokenProcessPool as exc:
                raise InputError(f"{base.path}: the process reading transformers' conversion rules for it died "
                                 f"({exc}); is memory short?") from None
    _store(cached, json.dumps(dataclasses.asdict(layout), default=sorted))
    return layout


def _cache_path(base: HFModel) -> Path:
    """Where the layout of `base` is cached (refused in one line without transformers: there is no layout)."""
    try:
        version = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        raise _without_transformers(base) from None
    rules = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()  # this module's reading of them
    key = json.dumps([version, rules, base.config, sorted((n, list(s.shape)) for n, s in base.sources.items())],
                     sort_keys=True, default=str)
    return cache_root() / "layouts" / f"{hashlib.sha256(key.encode()).hexdigest()}.json"


def _store(path: Path, text: str) -> None:
    """Write a cache file atomically; a cache that cannot be written is only slower next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as out:
            out.write(text)
        os.replace(out.name, path)
    except OSError:
        pass


def _layout_from_json(data: dict[str, Any]) -> Layout:
    return Layout(pieces={n: tuple(Piece(**p) for p in ps) for n, ps in data["pieces"].items()},
                  shapes={n: tuple(s) for n, s in data["shapes"].items()}, unsupported=data["unsupported"],
                  parameters=data["parameters"], transposed=frozenset(data["transposed"]),
                  tied={n: (a, b) for n, (a, b) in data["tied"].items()}, linear=frozenset(data["linear"]))


def _checkpoint_layout(base: HFModel) -> Layout:
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    model = _meta_model(base)
    meta = model.state_dict()
    conversions = get_model_conversion_mapping(model)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    pieces: dict[str, list[Piece]] = {}
    fused: dict[str, list[tuple[int, int, str]]] = {}  # in-memory name -> (projection, expert, on-disk name)
    unsupported: dict[str, str] = {}
    for disk in base.sources:
        name, pattern = rename_source_key(disk, renamings, converters, model.base_model_prefix, meta)
        if pattern is None:
            pieces.setdefault(name, []).append(Piece(disk))
            continue
        converter = next(c for c in converters if pattern in c.source_patterns)
        if not _fusion_supported(converter.operations):
            unsupported[name] = f"transformers loads it from {disk!r} through {converter.operations}"
            continue
        expert = re.search(rf"\.(\d+){re.escape(pattern.split('*', 1)[-1])}$", disk)
        if "*" not in pattern or expert is None:
            unsupported[name] = f"cannot find the expert number in {disk!r} (pattern {pattern!r})"
            continue
        fused.setdefault(name, []).append((converter.source_patterns.index(pattern), int(expert.group(1)), disk))
    for name, found in fused.items():
        pieces[name] = _fused_pieces(base, name, found, tuple(meta[name].shape) if name in meta else None,
                                     unsupported)
    parameters: dict[str, list[str]] = {}
    for full in meta:
        module, _, leaf = full.rpartition(".")
        parameters.setdefault(module, []).append(leaf)
    transposed = frozenset(n for n, m in model.named_modules() if getattr(m, "is_transposed", False))
    found = {n: tuple(p) for n, p in pieces.items() if p}
    linear = frozenset(found[f"{n}.weight"][0].name for n, m in model.named_modules()
                       if isinstance(m, torch.nn.Linear) and len(found.get(f"{n}.weight", ())) == 1)
    return Layout(found, {n: tuple(t.shape) for n, t in meta.items()}, unsupported, parameters, transposed,
                  _tied(model, found), linear)


def _tied(model: Any, pieces: dict[str, tuple[Piece, ...]]) -> dict[str, tuple[str, str]]:
    """Parameters the model shares with another (a tied head) that have no tensor on disk: the on-disk tensor they
    share, and the name `save_pretrained` gives them on their own (transformers' conversions reversed)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange, WeightRenaming, apply_renamings

    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    conversions = [c for c in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(c, PrefixChange)]
    saving = [r for r in (c.reverse_transform() for c in conversions[::-1]) if isinstance(r, WeightRenaming)]
    tied = {}
    for shared in names.values():
        owner = next((n for n in shared if n in pieces and len(pieces[n]) == 1), None)
        for name in shared:
            if owner is not None and name not in pieces:
                tied[name] = (pieces[owner][0].name, apply_renamings(name, saving))
    return tied


def _fused_pieces(base: HFModel, name: str, found: list[tuple[int, int, str]], shape: tuple[int, ...] | None,
                  unsupported: dict[str, str]) -> list[Piece]:
    """The per-expert pieces of a fused tensor [experts, rows, cols]: projection p of expert e at the rows after
    the projections before p (`Concatenate(dim=1)` of the stacked experts)."""
    projections = sorted({p for p, _, _ in found})
    rows = {p: base.sources[next(d for q, _, d in found if q == p)].shape[0] for p in projections}
    experts = sorted({e for _, e, _ in found})
    expected = (len(experts), sum(rows.values()))
    if shape is None or tuple(shape[:2]) != expected or experts != list(range(len(experts))) or len(found) != len(
            experts) * len(projections):
        unsupported[name] = (f"its on-disk experts ({len(experts)} x {len(projections)} tensors) do not stack into "
                             f"the in-memory shape {list(shape or ())}")
        return []
    starts = {p: sum(rows[q] for q in projections if q < p) for p in projections}
    return [Piece(disk, expert, starts[p]) for p, expert, disk in sorted(found, key=lambda f: (f[1], f[0]))]
