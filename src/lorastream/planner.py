"""The merge plan: every output tensor with its sources, the shard layout, and what the job needs.

Planning is pure: it works from headers and adapter shapes only, so `lorastream plan` can tell a user
what a job needs before a single weight byte is read.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from huggingface_hub import split_state_dict_into_shards_factory

from .adapters.lora import Adapter, LoraModule
from .codecs import Encoding, Source, kernels
from .codecs.bnb4 import Bnb4Encoding, RoundTripSource
from .codecs.plain import TensorRef
from .errors import InputError
from .formats.hf import HFModel
from .formats.safetensors import TensorSpec
from .memory import format_size
from .vocabulary import component, new_vocab_size, updated_config

# Models whose linear layers are GPT-2 `Conv1D` (weights stored [in, out]): the tie-breaker for square weights.
CONV1D_MODEL_TYPES = {"gpt2", "openai-gpt", "imagegpt", "decision_transformer"}
# A block of fewer rows makes torch's CPU matmul take another kernel whose rounding differs from the
# whole-matrix product PEFT computes (measured: 1-11 rows differ, 12 and more match), so blocks that split
# a tensor have at least this many rows; planned blocks hold at least twice as many, so a short tail can
# be balanced with the block before it.
MIN_BLOCK_ROWS = 16
# Above this many elements per block, larger blocks stop paying off and only cost memory.
MAX_BLOCK_ELEMENTS = 1 << 20
# Headroom for Python objects, allocator slack and the progress display, on top of measured baseline RSS.
RESERVE_BYTES = 48 << 20
HEADER_ALLOWANCE = 1 << 20


@dataclass(frozen=True)
class Delta:
    """One LoRA term added to a tensor: `weight · scale · (B @ A)`, transposed when rows are A's columns."""

    lora: LoraModule
    weight: float
    transposed: bool

    @property
    def scale(self) -> float:
        return self.lora.scale * self.weight

    @property
    def fp32_bytes(self) -> int:
        """Memory the A and B tensors take while their module is merged (read, then upcast); of one expert's factors
        only its slice is kept (see `load_bytes`)."""
        lora = self.lora
        if lora.expert is None:
            return (lora.a.numel + lora.b.numel) * (4 + lora.a.dtype.itemsize)
        return lora.rank * sum(lora.update_shape) * 4

    @property
    def load_bytes(self) -> int:
        """What one expert's delta holds for a moment while it is loaded: every expert's factors, read whole."""
        lora = self.lora
        return 0 if lora.expert is None else (lora.a.numel + lora.b.numel) * lora.a.dtype.itemsize + self.fp32_bytes


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of the output and how to compute it from its sources."""

    name: str
    source: Source
    dtype: torch.dtype
    deltas: tuple[Delta, ...] = ()
    bias_deltas: tuple[tuple[TensorRef, float], ...] = ()
    magnitude: TensorRef | None = None
    origin: str = "base"  # "adapter" when an adapter tensor replaces the base one
    encoding: Encoding | None = None  # written quantized (then `dtype` is the compute dtype it records)
    token_rows: tuple[tuple[TensorRef, tuple[int, ...]], ...] = ()  # PEFT TrainableTokens: rows set to new values

    @property
    def specs(self) -> list[TensorSpec]:
        """The tensors this output is stored as: itself, or a quantized weight and its statistics."""
        if self.encoding is None:
            return [TensorSpec(self.name, self.dtype, self.shape)]
        return [TensorSpec(*spec) for spec in self.encoding.specs(self.name, self.shape)]

    @property
    def row_alignment(self) -> int:
        align = self.source.row_alignment
        return align if self.encoding is None else math.lcm(align, self.encoding.row_alignment(self.row_elements))

    @property
    def is_replacement(self) -> bool:
        return self.origin == "adapter"

    @property
    def shape(self) -> tuple[int, ...]:
        return self.source.shape

    @property
    def nbytes(self) -> int:
        return sum(spec.nbytes for spec in self.specs)

    @property
    def rows(self) -> int:
        return self.source.rows

    @property
    def row_elements(self) -> int:
        return self.source.row_elements

    @property
    def is_copy(self) -> bool:
        """True when the output bytes equal the stored bytes, so they can be copied without decoding."""
        return not self.needs_fp32 and isinstance(self.source, TensorRef) and self.dtype == self.source.dtype

    @property
    def min_block_rows(self) -> int:
        """The smallest row block this tensor can be split into (aligned, balanced tail)."""
        return min(self.rows, 2 * (MIN_BLOCK_ROWS + self.row_alignment))

    @property
    def needs_fp32(self) -> bool:
        return bool(self.deltas or self.bias_deltas or self.magnitude or self.encoding or self.token_rows)


@dataclass(frozen=True)
class Shard:
    filename: str
    tensors: tuple[OutputTensor, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def specs(self) -> list[TensorSpec]:
        return [spec for t in self.tensors for spec in t.specs]


def describe(buffers: Sequence[tuple[str, int]]) -> str:
    """`2 input blocks (one read ahead): 4 B + ...`: what a row-block element costs, buffer by buffer."""
    return " + ".join(f"{what}: {size} B" for what, size in buffers)


@dataclass(frozen=True)
class MemoryPlan:
    """How the budget is spent: measured baseline, adapter tensors, and the reused row-block buffers.

    `in_flight` names every buffer the engine holds at once, each with its bytes per row-block element.
    """

    budget: int
    baseline: int
    reserve: int
    adapter_peak: int
    block_elements: int
    min_block_elements: int
    in_flight: tuple[tuple[str, int], ...] = ()
    io_buffers: int = 0  # remote storage: ranged-read copies and the multipart upload buffer
    # merging on an accelerator (`--device cuda`): its memory budget, the adapter tensors and blocks it holds
    gpu_budget: int = 0
    gpu_adapter_peak: int = 0
    gpu_in_flight: tuple[tuple[str, int], ...] = ()
    gpu_libraries: int = 0  # what torch's libraries keep on the device for good (the cuBLAS workspace)

    @property
    def bytes_per_element(self) -> int:
        return sum(size for _, size in self.in_flight)

    @property
    def gpu_bytes_per_element(self) -> int:
        return sum(size for _, size in self.gpu_in_flight)

    @property
    def gpu_minimum(self) -> int:
        """The smallest accelerator budget with which the job can run (0 on the CPU)."""
        return self.gpu_libraries + self.gpu_adapter_peak + self.min_block_elements * self.gpu_bytes_per_element

    def describe_buffers(self) -> str:
        """What a row-block element costs on the host, buffer by buffer."""
        return describe(self.in_flight)

    @property
    def minimum(self) -> int:
        """The smallest budget with which the job can run."""
        return (self.baseline + self.reserve + self.io_buffers + self.adapter_peak
                + self.min_block_elements * self.bytes_per_element)

    @property
    def fits(self) -> bool:
        return self.budget >= self.minimum and self.gpu_budget >= self.gpu_minimum


@dataclass(frozen=True)
class Plan:
    base: HFModel
    adapters: tuple[tuple[Adapter, float], ...]
    out_dir: Path
    tensors: tuple[OutputTensor, ...]
    shards: tuple[Shard, ...]
    memory: MemoryPlan
    disk_needed: int
    disk_free: int
    max_shard_size: int
    dtype: torch.dtype | None
    targets: dict[str, list[str]] = field(default_factory=dict)
    quantize: Encoding | None = None
    vocab_size: int | None = None  # the adapter resized the vocabulary (added tokens)
    untie: bool = False  # a tied head is written apart from the embedding
    # a single-file format's bytes known while planning, each before the data of the tensor at its index (at
    # len(tensors): after the last): the GGUF header, and the tensors llama.cpp computes from config.json
    fixed_bytes: tuple[tuple[int, bytes], ...] = ()

    @property
    def changed(self) -> dict[str, int]:
        """How many tensors of the output the adapters change, per component of the model."""
        counts: dict[str, int] = {}
        for tensor in self.tensors:
            if tensor.deltas or tensor.bias_deltas or tensor.is_replacement or tensor.token_rows:
                counts[component(tensor.name)] = counts.get(component(tensor.name), 0) + 1
        return dict(sorted(counts.items()))

    @property
    def total_size(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def fits_disk(self) -> bool:
        return self.disk_free >= self.disk_needed


@dataclass(frozen=True)
class Piece:
    """One on-disk tensor that holds an in-memory tensor whole, or (fused experts) expert `expert`'s rows
    [row_start, row_start + its rows) of it."""

    name: str
    expert: int | None = None
    row_start: int = 0


class TensorLayout(Protocol):
    """Where each in-memory tensor is on disk, and the ones lorastream cannot map back (see inputs/targets.py)."""

    @property
    def pieces(self) -> dict[str, tuple[Piece, ...]]: ...

    @property
    def unsupported(self) -> dict[str, str]: ...

    @property
    def tied(self) -> dict[str, tuple[str, str]]: ...

    @property
    def linear(self) -> frozenset[str]: ...


def _pieces(base: HFModel, on_disk: TensorLayout | None, name: str) -> tuple[Piece, ...] | None:
    """The on-disk tensors holding the in-memory tensor `name`: through transformers' conversions when the
    layout `on_disk` is known, else by name (also without the base-model prefix, `transformer.`)."""
    if on_disk is not None:
        if name in on_disk.unsupported:
            raise InputError(f"{base.path}: the adapter changes {name!r}, which {on_disk.unsupported[name]}; "
                             "lorastream cannot map that change back to the checkpoint's tensors")
        found = on_disk.pieces.get(name)
        if found is not None:
            return found
        if name in on_disk.tied:  # a tied head: PEFT merges into the tensor it shares with the embedding
            return (Piece(on_disk.tied[name][0]),)
    candidates = [name] + ([name.split(".", 1)[1]] if name.count(".") > 1 else [])
    return next(((Piece(c),) for c in candidates if c in base.sources), None)


def _base_name(base: HFModel, on_disk: TensorLayout | None, name: str) -> str | None:
    """The one on-disk tensor that holds the in-memory tensor `name` whole, None when there is none."""
    found = _pieces(base, on_disk, name)
    if found is None:
        return None
    if len(found) != 1 or found[0].expert is not None:
        raise InputError(f"{base.path}: {name!r} is stored as {len(found)} per-expert tensors; only a LoRA on the "
                         "fused parameter (target_parameters) can be mapped onto them")
    return found[0].name


def _is_transposed(base: HFModel, lora: LoraModule, weight: Source) -> bool:
    """Whether the base stores this module's weight as the transpose of `B @ A` (embeddings, GPT-2 Conv1D)."""
    out_features, in_features = lora.update_shape
    if len(weight.shape) != 2:
        raise InputError(f"{weight.path}: tensor {weight.name!r} has shape {list(weight.shape)}; the adapter "
                         f"targets it with a LoRA update of shape [{out_features}, {in_features}]")
    if lora.row_offset is not None:
        if weight.shape[1] != in_features or lora.row_offset + out_features > weight.shape[0] or lora.embedding:
            raise InputError(f"{lora.a.path}: module {lora.module!r}: LoRA update [{out_features}, {in_features}] "
                             f"at row {lora.row_offset} does not fit base tensor {weight.name!r} of shape "
                             f"{list(weight.shape)}")
        return False
    if lora.embedding:
        transposed = True
    elif out_features == in_features:
        transposed = base.model_type in CONV1D_MODEL_TYPES
    else:
        transposed = weight.shape == (in_features, out_features)
    expected = (in_features, out_features) if transposed else (out_features, in_features)
    if weight.shape != expected:
        raise InputError(f"{lora.a.path}: module {lora.module!r}: LoRA update [{out_features}, {in_features}] "
                         f"does not fit base tensor {weight.name!r} of shape {list(weight.shape)} "
                         "(an adapter for another model?)")
    return transposed


@dataclass
class _Contributions:
    deltas: list[Delta] = field(default_factory=list)
    bias_deltas: list[tuple[TensorRef, float]] = field(default_factory=list)
    magnitude: TensorRef | None = None
    replacement: TensorRef | None = None
    token_rows: list[tuple[TensorRef, tuple[int, ...]]] = field(default_factory=list)


def _parameter_deltas(base: HFModel, on_disk: TensorLayout | None, lora: LoraModule,
                      weight: float) -> list[tuple[str, Delta]]:
    """A LoRA on an `nn.Parameter` as deltas of the tensors on disk: the parameter itself (2-D, or one delta per
    expert of a 3-D one, at that expert's rows), or each expert's piece of a fused one, its slice of the update."""
    assert lora.parameter is not None
    target = lora.parameter
    found = _pieces(base, on_disk, target.name)
    if not found:
        raise InputError(f"{lora.a.path}: parameter {target.name!r} has no tensor in the base model {base.path}")
    experts = lora.experts
    rows, cols = target.shape[-2:]
    update = (cols, rows) if target.transposed else (rows, cols)  # one expert's B @ A
    if lora.update_shape != update:
        raise InputError(f"{lora.a.path}: parameter {target.name!r}: LoRA update {list(lora.update_shape)} per expert "
                         f"does not fit its shape {list(target.shape)}")
    deltas = []
    for piece in found:
        ref = base.sources[piece.name]
        if piece.expert is None:  # stored as it is in memory
            if tuple(ref.shape) != target.shape:
                raise InputError(f"{ref.path}: tensor {piece.name!r} has shape {list(ref.shape)}, the parameter "
                                 f"{target.name!r} {list(target.shape)}")
            if experts == 1:
                deltas.append((piece.name, Delta(lora, weight, False)))
            else:  # [experts, rows, cols] read as experts x rows rows: each expert's update at its rows
                deltas += [(piece.name, Delta(dataclasses.replace(lora, expert=e, row_offset=e * rows), weight,
                                              target.transposed)) for e in range(experts)]
        else:
            if target.transposed or ref.shape[-1] != cols:
                raise InputError(f"{ref.path}: tensor {piece.name!r} of shape {list(ref.shape)} is not a row block "
                                 f"of parameter {target.name!r} {list(target.shape)}")
            part = dataclasses.replace(lora, expert=piece.expert, out_rows=(piece.row_start,
                                                                            piece.row_start + ref.shape[0]))
            deltas.append((piece.name, Delta(part, weight, False)))
    return deltas


def _collect(base: HFModel, adapters: tuple[tuple[Adapter, float], ...],
             on_disk: TensorLayout | None) -> tuple[dict[str, _Contributions], dict[str, list[str]], bool]:
    """Map every adapter tensor to the base tensor it changes; refuse any it cannot place. Also says whether a tied
    head is now written apart from the embedding."""
    found: dict[str, _Contributions] = {}
    targets: dict[str, list[str]] = {}
    untie = False
    for adapter, weight in adapters:
        if adapter.unresolved:
            raise InputError(f"{adapter.source}: target_parameters LoRA was read without its base model")
        missing: list[str] = []
        for module, lora in adapter.modules.items():
            if lora.parameter is not None:
                for name, delta in _parameter_deltas(base, on_disk, lora, weight):
                    found.setdefault(name, _Contributions()).deltas.append(delta)
                    targets.setdefault(name, []).append(f"{adapter.source}:{module}")
                continue
            name = _base_name(base, on_disk, lora.weight_name)
            if name is None:
                missing.append(module)
                continue
            ref = base.sources[name]
            entry = found.setdefault(name, _Contributions())
            entry.deltas.append(Delta(lora, weight, _is_transposed(base, lora, ref)))
            targets.setdefault(name, []).append(f"{adapter.source}:{module}")
            if lora.magnitude is not None:
                if entry.magnitude is not None or len(adapters) > 1:
                    raise InputError(f"{lora.magnitude.path}: module {module!r}: DoRA cannot be combined with "
                                     "other adapters on the same module")
                expected = ref.shape[1] if entry.deltas[-1].transposed else ref.shape[0]
                if lora.magnitude.shape != (expected,):
                    raise InputError(f"{lora.magnitude.path}: module {module!r}: magnitude of shape "
                                     f"{list(lora.magnitude.shape)}, expected [{expected}]")
                entry.magnitude = lora.magnitude
            if lora.bias is not None:
                bias_name = _base_name(base, on_disk, f"{lora.module}.bias")
                if bias_name is None:
                    raise InputError(f"{lora.bias.path}: module {module!r}: lora_bias needs a bias in the base "
                                     "layer, and the base has none")
                if base.sources[bias_name].shape != lora.bias.shape:
                    raise InputError(f"{lora.bias.path}: module {module!r}: lora_B.bias of shape "
                                     f"{list(lora.bias.shape)} does not fit {bias_name!r}")
                found.setdefault(bias_name, _Contributions()).bias_deltas.append((lora.bias, lora.scale * weight))
        if missing:  # every adapter tensor is applied, or the merge is refused naming the ones that cannot be
            more = f" and {len(missing) - 6} more" if len(missing) > 6 else ""
            shown = ", ".join(repr(m) for m in missing[:6]) + more
            raise InputError(f"{adapter.source}: {len(missing)} LoRA modules have no weight in the base model "
                             f"{base.path}: {shown} (an adapter for another model?)")
        for name, ref in adapter.replacements.items():
            target = _replaced(base, on_disk, adapter, name)
            if target is None:
                continue
            if target not in base.sources and on_disk is not None and name in on_disk.tied:
                untie = True
            entry = found.setdefault(target, _Contributions())
            if entry.replacement is not None:
                raise InputError(f"{ref.path}: tensor {name!r} is replaced by more than one adapter")
            entry.replacement = ref
            targets.setdefault(target, []).append(f"{adapter.source}:{name} (replaces)")
        for module, (values, indices) in adapter.token_rows.items():
            name = _base_name(base, on_disk, f"{module}.weight")
            if name is None:
                raise InputError(f"{values.path}: trainable tokens of {module!r}: no such embedding in {base.path}")
            rows = (found[name].replacement or base.sources[name]) if name in found else base.sources[name]
            if values.shape[1] != rows.shape[1] or max(indices) >= rows.shape[0] or min(indices) < 0:
                raise InputError(f"{values.path}: trainable tokens of {module!r} (indices up to {max(indices)}, "
                                 f"{values.shape[1]} wide) do not fit {name!r} of shape {list(rows.shape)}")
            found.setdefault(name, _Contributions()).token_rows.append((values, indices))
            targets.setdefault(name, []).append(f"{adapter.source}:{module} (token rows)")
    return found, targets, untie


def _replaced(base: HFModel, on_disk: TensorLayout | None, adapter: Adapter, name: str) -> str | None:
    """The on-disk tensor an adapter's whole tensor replaces. A tied head's trained copy (`modules_to_save`) is
    written apart from the embedding, under the head's own on-disk name; a saved copy of its base layer stands for
    the shared tensor (None: the adapter replaces that tensor already)."""
    if on_disk is not None and name in on_disk.tied:
        shared, own = on_disk.tied[name]
        if name not in adapter.saved_base:
            return own
        saved = {_base_name(base, on_disk, n) for n in adapter.saved_base if n not in on_disk.tied}
        return None if shared in saved else shared
    return _base_name(base, on_disk, name) or name


def _output_dtype(source: Source, dtype: torch.dtype | None, like: Source | None = None) -> torch.dtype:
    """`--dtype` for floating tensors, else the dtype the base tensor has dense (a replacement takes its base's)."""
    if not source.dtype.is_floating_point:
        return source.dtype
    return dtype or (like or source).dense_dtype


def _output_tensors(base: HFModel, found: dict[str, _Contributions], dtype: torch.dtype | None) -> list[OutputTensor]:
    outputs: list[OutputTensor] = []
    names = list(base.sources) + [n for n in found if n not in base.sources]
    for name in names:
        ref = base.sources.get(name)
        entry = found.get(name, _Contributions())
        # A replacement (modules_to_save, a trained bias, a saved embedding) becomes the tensor LoRA adds to.
        source = entry.replacement or ref
        assert source is not None
        outputs.append(OutputTensor(name, source, _output_dtype(source, dtype, ref), tuple(entry.deltas),
                                    tuple(entry.bias_deltas), entry.magnitude,
                                    "base" if entry.replacement is None else "adapter",
                                    token_rows=tuple(entry.token_rows)))
    return outputs


def _shards(tensors: list[OutputTensor], max_shard_size: int) -> tuple[Shard, ...]:
    """Hugging Face's greedy shard layout, computed from sizes alone."""
    by_name = {t.name: t for t in tensors}
    split = split_state_dict_into_shards_factory(by_name, get_storage_size=lambda t: t.nbytes,
                                                 filename_pattern="model{suffix}.safetensors",
                                                 max_shard_size=max_shard_size)
    return tuple(Shard(filename, tuple(by_name[n] for n in names))
                 for filename, names in split.filename_to_tensors.items())


def _adapter_bytes(tensor: OutputTensor, encoder_state: bool = True) -> int:
    """What one output holds while it computes `tensor`: its LoRA factors, DoRA magnitude, encoder state (on
    the host also with an accelerator)."""
    return (sum(d.fp32_bytes for d in tensor.deltas) + max((d.load_bytes for d in tensor.deltas), default=0)
            + (tensor.magnitude.numel * 8 if tensor.magnitude else 0)
            + sum(values.numel * 8 for values, _ in tensor.token_rows)
            + (tensor.encoding.state_bytes(tensor.source.numel) if tensor.encoding and encoder_state else 0))


def _memory_plan(outputs: Sequence[Sequence[OutputTensor]], budget: int, baseline: int,
                 io_buffers: int = 0, gpu_budget: int = 0, gpu_libraries: int = 0) -> MemoryPlan:
    """The budget of one pass producing every output (their tensors position by position) block by block;
    with a `gpu_budget` the blocks are computed on an accelerator and must fit its memory too."""
    decoded = [t for tensors in outputs for t in tensors if not t.is_copy]
    if not decoded:
        return MemoryPlan(budget, baseline, RESERVE_BYTES, 0, 0, 0, io_buffers=io_buffers, gpu_budget=gpu_budget,
                          gpu_libraries=gpu_libraries)
    in_item = max(t.source.decode_bytes_per_element for t in decoded)
    out_item = max(max(t.dtype.itemsize for t in decoded), 1)
    compute: list[tuple[str, int]] = []  # where the merge computes: the host, or the accelerator
    if any(t.needs_fp32 for t in decoded):
        compute.append(("float32 work and LoRA product", 8))
    if any(t.magnitude is not None and t.deltas[0].transposed for t in decoded):
        compute.append(("DoRA column norms in float64", 16))  # the square and its block
    encode = max((t.encoding.encode_bytes_per_element for t in decoded if t.encoding), default=0)
    if encode:
        compute.append(("quantizer temporaries", encode))
    in_flight = [("2 input blocks (one read ahead)", 2 * in_item),
                 (f"{len(outputs) + 1} output blocks (written behind)", (len(outputs) + 1) * out_item), *compute]
    gpu_in_flight = [("2 input blocks decoded (one read ahead)", 2 * in_item),
                     ("encoded block", out_item), *compute] if gpu_budget else []
    # every output's adapter tensors for one tensor position at once, and each source read there once
    adapter_peak = max(sum(_adapter_bytes(t) for t in position if not t.is_copy)
                       + sum({id(t.source): getattr(t.source, "resident_bytes", 0)
                              for t in position if not t.is_copy}.values()) for position in zip(*outputs, strict=True))
    min_elements = max(t.min_block_rows * t.row_elements for t in decoded)
    per_element = sum(size for _, size in in_flight)
    # the compiled codec kernels, loaded on first use (after the baseline was measured)
    coded = any(getattr(t.source, "uses_kernels", False) or getattr(t.encoding, "uses_kernels", t.encoding is not None)
                for t in decoded)
    reserve = RESERVE_BYTES + (kernels.load_bytes() if coded else 0)
    spare = budget - baseline - reserve - io_buffers - adapter_peak
    elements = min(MAX_BLOCK_ELEMENTS, spare // per_element)
    gpu_adapter_peak = 0
    if gpu_budget:  # the accelerator holds the LoRA factors and magnitudes of one position, not encoder state
        gpu_adapter_peak = max(sum(_adapter_bytes(t, encoder_state=False) for t in position if not t.is_copy)
                               for position in zip(*outputs, strict=True))
        elements = min(elements, (gpu_budget - gpu_libraries - gpu_adapter_peak)
                       // sum(size for _, size in gpu_in_flight))
    return MemoryPlan(budget, baseline, reserve, adapter_peak, max(min_elements, elements), min_elements,
                      tuple(in_flight), io_buffers, gpu_budget, gpu_adapter_peak, tuple(gpu_in_flight), gpu_libraries)


# Weights transformers keeps dense when it quantizes a model (embeddings, the output head).
_KEPT_DENSE = re.compile(r"(^|\.)(lm_head|embed_tokens|embed_positions|wte|wpe|embed_in|embed_out|word_embeddings|"
                         r"position_embeddings|token_type_embeddings|shared|output)\.weight$")


def skip_modules(base: HFModel) -> list[str]:
    """Modules the output keeps dense when quantized: the base's own skip list, else transformers' default."""
    configured = (base.config.get("quantization_config") or {}).get("llm_int8_skip_modules")
    return list(configured) if configured else ["lm_head"]


def _is_quantizable(tensor: OutputTensor, base: HFModel, on_disk: TensorLayout | None) -> bool:
    """Whether transformers would store `tensor` quantized: a linear weight outside the skip list. Where the model's
    layout is known, only an `nn.Linear`'s weight: bitsandbytes leaves other modules' parameters dense (a router, a
    fused-experts parameter, whose pieces are 2-D tensors on disk)."""
    module = tensor.name.removesuffix(".weight")
    linear = len(tensor.shape) == 2 and tensor.name.endswith(".weight") and tensor.source.dtype.is_floating_point
    skipped = any(module == skip or module.endswith(f".{skip}") for skip in skip_modules(base))
    in_memory = on_disk is None or tensor.name in on_disk.linear
    return linear and in_memory and not skipped and not _KEPT_DENSE.search(tensor.name)


def _trained_on(tensor: OutputTensor, base: HFModel, encoding: Bnb4Encoding,
                round_trips: dict[str, RoundTripSource], on_disk: TensorLayout | None) -> OutputTensor:
    """Read a dense linear weight through 4-bit quantization, as QLoRA training saw it (one source per base
    tensor in `round_trips`, so outputs of one pass read it once)."""
    if not _is_quantizable(tensor, base, on_disk) or tensor.is_replacement:
        return tensor
    if not isinstance(tensor.source, TensorRef):
        raise InputError(f"{tensor.source.path}: {tensor.name} is already quantized; --trained-on applies to a "
                         "dense base")
    return dataclasses.replace(tensor, source=round_trips.setdefault(tensor.name,
                                                                     RoundTripSource(tensor.source, encoding)))


# How a single-file format lays out one output: given the planned tensors (HF names, merged shapes), the merged
# model's config.json (vocab_size and tie_word_embeddings as the merge leaves them) and the adapters (whose
# folders may hold tokenizer files), the tensors in the file's order, named and encoded its way, and the bytes
# known already, each before the data of the tensor at its index (the GGUF header first).
Arrange = Callable[[list[OutputTensor], dict[str, Any], tuple[tuple[Adapter, float], ...]],
                   tuple[list[OutputTensor], tuple[tuple[int, bytes], ...]]]


def make_plan(base: HFModel, adapters: list[tuple[Adapter, float]], out_dir: Path, **options: Any) -> Plan:
    """Plan merging `adapters` (each with its weight) into `base`; pure, from headers only. The options are
    `make_plans`'."""
    return make_plans(base, [adapters], [out_dir], **options)[0]


def make_plans(base: HFModel, jobs: Sequence[list[tuple[Adapter, float]]], out_dirs: Sequence[Path], *, budget: int,
               baseline: int | Callable[[], int], disk_free: int, max_shard_size: int,
               dtype: torch.dtype | None = None, quantize: Encoding | None = None,
               trained_on: Bnb4Encoding | None = None, io_buffers: int = 0, gpu_budget: int = 0,
               gpu_libraries: int = 0, on_disk: TensorLayout | None = None, arrange: Arrange | None = None,
               single_file: str = "") -> list[Plan]:
    """Plan each of `jobs` (adapters with weights) merged into `base` on its own, all produced in one pass over
    the base (`merge --each`): a base tensor is one source for every plan, so the engine reads each row block
    once, and the plans share one memory plan that holds every output's buffers and adapter tensors.

    `quantize` writes linear weights quantized; `trained_on` reads dense linear weights through that 4-bit
    quantization first (the weights a QLoRA adapter was trained against); `io_buffers` is what remote storage
    holds in memory (see `storage.io_buffer_bytes`); `gpu_budget` is the accelerator memory the merge may take
    when it computes there (0: on the CPU), `gpu_libraries` what torch's libraries keep there for good;
    `on_disk` maps the adapter's in-memory module names to the checkpoint's tensors (see inputs/targets.py).
    A single-file format (GGUF) passes `arrange`, which orders, names and encodes each output's tensors its way
    and gives the bytes it writes between their data (see `Arrange`), and the `single_file` name of its one
    shard. `baseline` may be a function: the process's RSS is then measured after `arrange` has run (a GGUF
    header holds a whole tokenizer)."""
    if quantize is not None and base.model_type in CONV1D_MODEL_TYPES:
        raise InputError(f"{base.path}: {base.model_type} stores linear layers as Conv1D; writing them "
                         "quantized is not supported")
    round_trips: dict[str, RoundTripSource] = {}
    planned = []
    for adapters in jobs:
        frozen = tuple(adapters)
        found, targets, untie = _collect(base, frozen, on_disk)
        tensors = _output_tensors(base, found, dtype)
        vocab = new_vocab_size(base, {t.name: t.shape for t in tensors if t.is_replacement})
        if trained_on is not None:
            tensors = [_trained_on(t, base, trained_on, round_trips, on_disk) for t in tensors]
        if quantize is not None:
            tensors = [dataclasses.replace(t, encoding=quantize) if _is_quantizable(t, base, on_disk) else t
                       for t in tensors]
        fixed_bytes: tuple[tuple[int, bytes], ...] = ()
        if arrange is not None:
            tensors, fixed_bytes = arrange(tensors, updated_config(base.config, vocab, untie), frozen)
        shards = (Shard(single_file, tuple(tensors)),) if single_file else _shards(tensors, max_shard_size)
        if planned and layout(shards) != layout(planned[0][3]):
            raise InputError(f"{frozen[0][0].source}: its output {_layout_difference(shards, planned[0][3])} "
                             f"{planned[0][0][0][0].source}'s; one pass writes outputs laid out alike, so merge it "
                             "on its own")
        planned.append((frozen, targets, tensors, shards, vocab, untie, fixed_bytes))
    measured = baseline() if callable(baseline) else baseline
    memory = _memory_plan([p[2] for p in planned], budget, measured, io_buffers, gpu_budget, gpu_libraries)
    return [Plan(base, frozen, out_dir, tuple(tensors), shards, memory,
                 sum(s.nbytes for s in shards) + max(HEADER_ALLOWANCE, sum(len(b) for _, b in fixed)) * len(shards),
                 disk_free, max_shard_size, dtype, targets, quantize, vocab, untie, fixed)
            for (frozen, targets, tensors, shards, vocab, untie, fixed), out_dir in zip(planned, out_dirs,
                                                                                         strict=True)]


def layout(shards: Sequence[Shard]) -> list[tuple[str, list[tuple[str, int]]]]:
    """Every shard's file name with its tensors' names and sizes: what one pass needs its outputs to share."""
    return [(s.filename, [(t.name, t.nbytes) for t in s.tensors]) for s in shards]


def _layout_difference(shards: Sequence[Shard], first: Sequence[Shard]) -> str:
    """How an output's tensors differ from the first output's of an `--each` pass, in words (the first
    difference: an added or missing tensor, a resized one, such as a resized vocabulary, or the shards' split)."""
    ours = {t.name: (list(t.shape), t.nbytes) for s in shards for t in s.tensors}
    theirs = {t.name: (list(t.shape), t.nbytes) for s in first for t in s.tensors}
    if added := [name for name in ours if name not in theirs]:
        return f"has {len(added)} tensor(s) ({', '.join(added[:3])}) that are not in"
    if missing := [name for name in theirs if name not in ours]:
        return f"lacks {len(missing)} tensor(s) ({', '.join(missing[:3])}) that are in"
    for name, (shape, nbytes) in ours.items():
        if (shape, nbytes) != theirs[name]:
            return f"has {name} {shape} ({nbytes} bytes), against {theirs[name][0]} ({theirs[name][1]} bytes) in"
    return "splits its tensors into shards otherwise than"


def describe_shortfall(plan: Plan, *others: Plan) -> str | None:
    """Why the plan (with the `others` of its pass, which share its memory and disk) cannot run, with the
    numbers and the option that would make it fit; None when it can."""
    memory = plan.memory
    if memory.budget < memory.minimum:
        return (f"--max-memory {format_size(memory.budget)} is below the {format_size(memory.minimum)} "
                f"this job needs (baseline {format_size(memory.baseline)}, adapter tensors "
                f"{format_size(memory.adapter_peak)}, "
                + (f"remote I/O buffers {format_size(memory.io_buffers)}, " if memory.io_buffers else "")
                + "smallest row block "
                f"{format_size(memory.min_block_elements * memory.bytes_per_element)}: {memory.min_block_elements:,} "
                f"elements x ({memory.describe_buffers()})); use --max-memory {math.ceil(memory.minimum / 2**20)}MiB "
                "or more")
    if memory.gpu_budget < memory.gpu_minimum:
        return (f"--max-gpu-memory {format_size(memory.gpu_budget)} is below the {format_size(memory.gpu_minimum)} "
                f"this job needs on the GPU (cuBLAS workspace {format_size(memory.gpu_libraries)}, adapter tensors "
                f"{format_size(memory.gpu_adapter_peak)}, smallest row "
                f"block {format_size(memory.min_block_elements * memory.gpu_bytes_per_element)}: "
                f"{memory.min_block_elements:,} elements x ({describe(memory.gpu_in_flight)})); use "
                f"--max-gpu-memory {math.ceil(memory.gpu_minimum / 2**20)}MiB or more")
    needed = plan.disk_needed + sum(p.disk_needed for p in others)
    if plan.disk_free < needed:
        return (f"{plan.out_dir}: the output needs {format_size(needed)} and only "
                f"{format_size(plan.disk_free)} is free there; free {format_size(needed - plan.disk_free)} "
                "or choose another -o folder")
    return None
