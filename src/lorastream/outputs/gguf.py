"""The GGUF writer (`--format gguf`): one file llama.cpp, Ollama and LM Studio load, written straight from the
merged row blocks.

Everything before the tensor data (metadata, tokenizer, tensor infos with their offsets) depends only on the
config, the tokenizer files and the plan's shapes and types, so it is computed with gguf-py's `GGUFWriter`
before the merge starts; the tensor data then streams in plan order, each tensor padded to the alignment as
gguf-py pads it. The file is written under a temporary name in the staging folder and renamed into place
only when complete (to an object store: uploaded into the staging prefix, then copied to its key by the
service); a run killed before that leaves nothing under the output's name, and its rerun starts the file
over (the staging manifest never records a partial file).
"""

from __future__ import annotations

import dataclasses
import io
import json
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..adapters.lora import Adapter
from ..codecs.gguf_quants import GGUFEncoding, gguf_module
from ..dtypes import GGUF_DENSE_TYPES, GGUF_QUANT_PRESETS, GGUF_TORCH_DTYPES
from ..engine import ShardSink
from ..errors import InputError
from ..formats.hf import HFModel
from ..formats.safetensors import TensorSpec
from ..io.atomic import output_file
from ..io.locations import Location, copy_file
from ..planner import OutputTensor, Plan, Shard
from ..vocabulary import output_companions
from .gguf_layout import GGUFTensor, block_count, converter_types, hparams_of, layout
from .gguf_presets import PRESETS, preset_file_type, preset_types
from .gguf_vocab import add_vocab

# The name the GGUF has inside its staging folder; it is renamed to the output's own name when complete.
STAGED_NAME = "model.gguf"
ALIGNMENT = 32  # gguf-py's GGUF_DEFAULT_ALIGNMENT, which the converter keeps


def _pad(size: int) -> int:
    return -size % ALIGNMENT


def default_dense(model: HFModel) -> str:
    """The converter's `--outtype auto`: the dtype of the first 2-D tensor if bfloat16 or float16, else F16."""
    for source in model.sources.values():
        if len(source.shape) >= 2 and source.dtype.is_floating_point:
            dense = source.dense_dtype
            return "BF16" if dense == torch.bfloat16 else "F16"
    return "F16"


@dataclass(frozen=True)
class GGUFArrangement:
    """What a GGUF of a merged model holds, known before any tensor data: the merged tensors (GGUF name, type,
    row order) in file order, and the bytes known already, each before the merged tensor at its index: the
    header, and the data of the tensors the converter computes from config.json (rope factors)."""

    tensors: tuple[GGUFTensor, ...]
    fixed_bytes: tuple[tuple[int, bytes], ...]

    def arrange(self, planned: list[OutputTensor]) -> list[OutputTensor]:
        """The plan's tensors in GGUF order, named and encoded as llama.cpp writes them (those the converter
        drops, such as Gemma 2's head, are left out)."""
        by_name = {t.name: t for t in planned}
        return [dataclasses.replace(by_name[t.hf_name], name=t.name, encoding=_encoding(t, by_name[t.hf_name].dtype))
                for t in self.tensors]


@contextmanager
def tokenizer_folder(model: HFModel, config: dict[str, Any], companions: list[Location]) -> Iterator[Path]:
    """A local folder holding the merged model's config.json and tokenizer, as gguf-py's vocab readers need
    one: the base itself where the merge changes neither, else a temporary folder with what `--format hf`
    writes there (the updated config.json and the `companions`: the base's files, the adapter's tokenizer)."""
    if isinstance(model.path, Path) and config == model.config and companions == list(model.companion_files):
        yield model.path
        return
    with tempfile.TemporaryDirectory(prefix="lorastream-tokenizer-") as temp:
        for source in companions:
            copy_file(source, Path(temp) / source.name)
        (Path(temp) / "config.json").write_text(json.dumps(config))
        yield Path(temp)


def _encoding(tensor: GGUFTensor, stored: torch.dtype) -> GGUFEncoding | None:
    """How a tensor is encoded: none where its GGUF type is the dtype the merge writes anyway and its rows
    stay in place (the engine then copies an unchanged tensor as it is)."""
    qtype = tensor.qtype or "F32"
    if GGUF_TORCH_DTYPES.get(qtype) == stored and not tensor.head_rows and not tensor.shift:
        return None
    return GGUFEncoding(qtype, stored, tensor.head_rows, tensor.shift)


def check_types(dtype: str | None, quantize: str | None) -> None:
    """Refuse `--dtype` / `--quantize` values a GGUF cannot take, before anything is read."""
    gguf_module()
    if quantize is not None and quantize not in GGUF_QUANT_PRESETS:
        raise InputError(f"--quantize {quantize!r} with --format gguf: expected one of {', '.join(GGUF_QUANT_PRESETS)}")
    if quantize is not None and dtype is not None:
        raise InputError("--dtype picks the dense GGUF type; with --quantize the types are the preset's")


def arrangement(model: HFModel, config: dict[str, Any], tensors: list[tuple[str, tuple[int, ...]]],
                companions: list[Location], dtype: str | None, quantize: str | None) -> GGUFArrangement:
    """The GGUF layout and header of merging into `model`: the merged model has `config` (its vocab_size and
    tie_word_embeddings as the merge leaves them), these (HF name, shape) `tensors`, and the tokenizer among
    the `companions` (see `vocabulary.output_companions`). Dense in `dtype` (a --dtype name; default: the converter's
    auto) or quantized with a `--quantize` preset: q8_0 as `convert_hf_to_gguf.py --outtype q8_0` writes it,
    the others as `llama-quantize` makes them from the converter's 16-bit file."""
    gguf = gguf_module()
    hparams = hparams_of(config)
    family, laid_out = layout(config, tensors, model.path)
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[family.arch]])
    generated = dict(family.generate(writer, hparams))  # the converter makes these before any other key
    # first in the converter's file; llama-quantize's loader order puts them among the others by name
    laid_out = [*(GGUFTensor("", name, values.shape, "F32") for name, values in generated.items()), *laid_out]
    dense = GGUF_DENSE_TYPES[dtype] if dtype else default_dense(model)
    if quantize is None:
        laid_out, file_type = converter_types(laid_out, dense, None), {"F32": "ALL_F32", "F16": "MOSTLY_F16",
                                                                      "BF16": "MOSTLY_BF16"}[dense]
    elif quantize == "q8_0":
        laid_out, file_type = converter_types(laid_out, dense, "Q8_0"), "MOSTLY_Q8_0"
    else:
        laid_out, file_type = preset_types(laid_out, quantize, block_count(hparams)), preset_file_type(quantize)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(model.path.name)
    family.parameters(writer, hparams, block_count(hparams), int(gguf.LlamaFileType[file_type]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    with tokenizer_folder(model, config, companions) as folder:
        add_vocab(writer, folder, family.vocab, hparams.get("vocab_size"), model.path)
    if quantize not in (None, "q8_0"):  # llama-quantize sets these two last, moving them to the end
        for key in (gguf.Keys.General.QUANTIZATION_VERSION, gguf.Keys.General.FILE_TYPE):
            writer.remove_key(key)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_file_type(int(gguf.LlamaFileType[file_type]))
    for tensor in laid_out:
        assert tensor.qtype is not None
        spec = TensorSpec(*GGUFEncoding(tensor.qtype, torch.float32).specs(tensor.name, tensor.shape)[0])
        writer.add_tensor_info(tensor.name, list(tensor.shape), np.dtype(np.float32), spec.nbytes,
                               raw_dtype=gguf.GGMLQuantizationType[tensor.qtype])
    buffer = io.BytesIO()
    writer.fout = [buffer]
    writer.state = gguf.gguf_writer.WriterState.EMPTY
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    header = buffer.getvalue()
    fixed, merged = {0: header + bytes(_pad(len(header)))}, []
    for tensor in laid_out:  # the generated ones are small (one value per rotary pair): they travel with the plan
        if tensor.hf_name:
            merged.append(tensor)
            continue
        values = generated[tensor.name].tobytes()
        fixed[len(merged)] = fixed.get(len(merged), b"") + values + bytes(_pad(len(values)))
    return GGUFArrangement(tuple(merged), tuple(sorted(fixed.items())))


@dataclass
class GGUFArranger:
    """The planner's `Arrange` for `--format gguf`: each output laid out as the converter lays out the folder
    `--format hf` would write (the merged config, tensors and tokenizer). Outputs of one pass (`--each`) that
    agree on those share one header."""

    model: HFModel
    dtype: str | None
    quantize: str | None
    _made: dict[str, GGUFArrangement] = dataclasses.field(default_factory=dict)

    def __call__(self, planned: list[OutputTensor], config: dict[str, Any], adapters: tuple[tuple[Adapter, float], ...]
                 ) -> tuple[list[OutputTensor], tuple[tuple[int, bytes], ...]]:
        tensors = [(t.name, tuple(t.shape)) for t in planned]
        files = output_companions(self.model.companion_files, adapters)
        key = json.dumps([config, tensors, [str(f) for f in files]], sort_keys=True, default=str)
        if key not in self._made:
            self._made[key] = arrangement(self.model, config, tensors, files, self.dtype, self.quantize)
        arranged = self._made[key]
        return arranged.arrange(planned), arranged.fixed_bytes


def gguf_options(metadata: dict[str, Any]) -> dict[str, Any]:
    """The merge options that wrote a GGUF of this `general.file_type` (what `verify` recomputes it with)."""
    gguf = gguf_module()
    file_type = gguf.LlamaFileType(int(metadata.get("general.file_type", -1))).name
    dense = {"ALL_F32": "float32", "MOSTLY_F16": "float16", "MOSTLY_BF16": "bfloat16"}
    presets = {"MOSTLY_Q8_0": "q8_0", **{ftype: name for name, (ftype, _) in PRESETS.items()}}
    if file_type in dense:
        return {"format": "gguf", "dtype": dense[file_type]}
    if file_type in presets:
        return {"format": "gguf", "quantize": presets[file_type]}
    raise InputError(f"GGUF file type {file_type} is not one lorastream writes; it cannot be recomputed")


class GGUFSink:
    """Writes one GGUF file: each tensor's bytes as the engine streams them, padded to the alignment, with the
    bytes known at plan time (`fixed_bytes`: the header first) before the tensor at their index; committed
    (fsync, rename) only when every byte arrived."""

    def __init__(self, path: Location, fixed_bytes: tuple[tuple[int, bytes], ...], specs: list[TensorSpec]):
        self.path = path
        self._fixed = dict(fixed_bytes)
        self._sizes = [spec.nbytes for spec in specs]
        self._expected = sum(map(len, self._fixed.values())) + sum(size + _pad(size) for size in self._sizes)
        self._file = output_file(path, self._expected)
        self._index, self._left = 0, self._sizes[0] if self._sizes else 0
        self.size = 0
        self.crc32 = 0
        self._append(self._fixed.get(0, b""))
        self._close_empty()

    def _append(self, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B")
        self.crc32 = zlib.crc32(view, self.crc32)
        while view:
            done = self._file.write(view)
            view = view[done:]
            self.size += done

    def _close_empty(self) -> None:
        """Pad every finished tensor (zero-sized ones included) and move to the next."""
        while self._index < len(self._sizes) and self._left == 0:
            self._append(bytes(_pad(self._sizes[self._index])))
            self._index += 1
            self._append(self._fixed.get(self._index, b""))
            self._left = self._sizes[self._index] if self._index < len(self._sizes) else 0

    def write(self, chunk: memoryview | bytes) -> None:
        view = memoryview(chunk).cast("B")
        while view:
            if self._index >= len(self._sizes):
                raise AssertionError(f"{self.path}: more tensor data than the header announced")
            part = view[: self._left]
            self._append(part)
            self._left -= len(part)
            view = view[len(part):]
            self._close_empty()

    def copy_from(self, fd: int, offset: int, count: int) -> bool:
        return False  # unchanged tensors come through `write`, which pads them

    def commit(self) -> None:
        if self.size != self._expected:
            raise AssertionError(f"{self.path}: wrote {self.size} bytes, expected {self._expected}")
        self._file.finish()

    def abort(self) -> None:
        self._file.discard()


class GGUFFile:
    """`--format gguf`: the plan's single shard is the GGUF file; its header comes with the writer."""

    name = "gguf"
    last: tuple[str, ...] = ()
    single_file = True
    suffix = ".gguf"

    def __init__(self, fixed_bytes: tuple[tuple[int, bytes], ...] = ()):
        self.fixed_bytes = fixed_bytes

    def open_shard(self, folder: Location, shard: Shard, record: dict[str, Any]) -> ShardSink:
        if not self.fixed_bytes:
            raise InputError("--format gguf: the output needs its header, planned with the GGUF arrangement")
        return GGUFSink(folder / shard.filename, self.fixed_bytes, shard.specs)

    def finish(self, plan: Plan, folder: Location, record: dict[str, Any]) -> None:
        """Nothing beside the file: the GGUF is complete in itself (tokenizer and provenance inside)."""
