"""bitsandbytes 4-bit (NF4/FP4) weights as Hugging Face serializes them: decoding by row blocks.

The arithmetic follows bitsandbytes' documented flat-block formula (its default and CUDA kernels), in float32
with one cast at the end: `w[i] = (code[nibble[i]] * absmax[i // blocksize]).to(dtype)`, where a nested
(double-quantized) absmax is `nested_code[absmax_u8[b]] * nested_absmax[b // nested_blocksize] + offset`.
bitsandbytes 0.50's own CPU kernel is wrong when the inner dimension is not a multiple of 64; this is not.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..device import CPU
from ..dtypes import FLOAT_DTYPES
from ..errors import InputError
from . import kernels
from .geometry import SameGeometry
from .plain import TensorRef, buffer_region

if TYPE_CHECKING:
    from . import Source

QUANT_STATE_PREFIX = "weight.quant_state.bitsandbytes__"
# Sidecar tensors stored beside `<module>.weight`, relative to the module.
SIDECARS = ("weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map")


@dataclass(frozen=True)
class Bnb4Source:
    """A 4-bit weight: packed nibbles, per-block absmax (possibly itself quantized) and its quant state."""

    name: str
    packed: TensorRef
    absmax: TensorRef
    quant_map: TensorRef
    nested_absmax: TensorRef | None
    nested_quant_map: TensorRef | None
    quant_type: str
    blocksize: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    nested_blocksize: int
    nested_offset: float

    @property
    def path(self) -> Path:
        return self.packed.path

    @property
    def dense_dtype(self) -> torch.dtype:
        return self.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def row_elements(self) -> int:
        return self.numel // self.rows

    @property
    def stored_bytes(self) -> int:
        refs = (self.packed, self.absmax, self.quant_map, self.nested_absmax, self.nested_quant_map)
        return sum(r.nbytes for r in refs if r is not None)

    @property
    def row_alignment(self) -> int:
        """Rows per quantization block boundary: a block may start only where a 4-bit block starts."""
        return self.blocksize // math.gcd(self.row_elements, self.blocksize)

    # packed nibbles (0.5), their int64 indices (8), the looked-up code values and products (4 + 4),
    # the absmax expanded per element (4), the cast result (up to 4): the torch path's temporaries
    decode_bytes_per_element = 25
    uses_kernels = True

    @property
    def buffer_bytes_per_element(self) -> int:
        """The packed nibbles (a byte, rounded up), then the decoded values."""
        return 1 + self.dtype.itemsize

    @cached_property
    def _code(self) -> torch.Tensor:
        return self.quant_map.read().float()

    @cached_property
    def _nested(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.nested_absmax is None or self.nested_quant_map is None:
            return None
        return self.nested_quant_map.read().float(), self.nested_absmax.read().float()

    def _absmax(self, first_block: int, count: int) -> torch.Tensor:
        buffer = memoryview(bytearray(count * self.absmax.dtype.itemsize))
        raw = self.absmax.read_elements_into(first_block, count, buffer)
        if self._nested is None:
            return raw.float()
        nested_code, nested_absmax = self._nested
        return dequantize_nested(raw, nested_absmax, self.nested_offset, nested_code, first_block,
                                 self.nested_blocksize)

    def read_rows(self, start: int, stop: int, buffer: memoryview, device: torch.device = CPU) -> torch.Tensor:
        cols = self.row_elements
        first, count = start * cols, (stop - start) * cols
        if first % self.blocksize:
            raise AssertionError(f"{self.name}: row block {start} is not aligned to {self.blocksize}-value blocks")
        packed_bytes = (count + 1) // 2
        raw = _read_bytes(self.packed, first // 2, packed_bytes, buffer).to(device)
        absmax = self._absmax(first // self.blocksize, math.ceil(count / self.blocksize)).to(device)
        out, _ = buffer_region(buffer if device == CPU else None, packed_bytes, count, self.dtype)
        return kernels.decode_4bit(raw, self._code, absmax, self.blocksize, count, self.dtype,
                                   out).view(stop - start, cols)


def _read_bytes(ref: TensorRef, first_byte: int, count: int, buffer: memoryview) -> torch.Tensor:
    """Bytes [first_byte, first_byte + count) of a tensor stored as uint8 or as a float view of the same bytes."""
    view = TensorRef(ref.name, torch.uint8, (ref.nbytes,), ref.path, ref.offset)
    return view.read_elements_into(first_byte, count, buffer)


def read_quant_state(ref: TensorRef) -> dict[str, object]:
    try:
        state = json.loads(bytes(ref.read().tolist()).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{ref.path}: tensor {ref.name!r} is not the JSON quant state bitsandbytes writes") from exc
    if not isinstance(state, dict):
        raise InputError(f"{ref.path}: tensor {ref.name!r}: expected a JSON object")
    return state


def bnb4_source(module: str, tensors: dict[str, TensorRef], state_ref: TensorRef) -> Bnb4Source:
    """Build the source of `<module>.weight` from its serialized tensors and quant state."""
    state = read_quant_state(state_ref)
    where = f"{state_ref.path}: {module}.weight"

    def need(suffix: str) -> TensorRef:
        ref = tensors.get(f"{module}.{suffix}")
        if ref is None:
            raise InputError(f"{where}: missing {module}.{suffix}, which a 4-bit weight needs")
        return ref

    try:
        quant_type, blocksize = str(state["quant_type"]), int(state["blocksize"])  # type: ignore[arg-type]
        shape = tuple(int(d) for d in state["shape"])  # type: ignore[union-attr]
        dtype = FLOAT_DTYPES[str(state["dtype"]).removeprefix("torch.")]
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{where}: quant state lacks or garbles {exc}") from exc
    if quant_type not in ("nf4", "fp4") or blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
        raise InputError(f"{where}: unsupported quant_type {quant_type!r} / blocksize {blocksize}")
    nested = f"{module}.weight.nested_absmax" in tensors
    packed, absmax = need("weight"), need("weight.absmax")
    numel = math.prod(shape)
    if len(shape) != 2 or packed.nbytes != (numel + 1) // 2 or absmax.numel != math.ceil(numel / blocksize):
        raise InputError(f"{where}: packed bytes {packed.nbytes} / absmax {absmax.numel} do not fit shape "
                         f"{list(shape)} with blocksize {blocksize}")
    if (nested and absmax.dtype != torch.uint8) or (not nested and absmax.dtype != torch.float32):
        raise InputError(f"{where}: absmax dtype {absmax.dtype} does not match nested={nested}")
    nested_blocksize = int(state.get("nested_blocksize", 256))  # type: ignore[arg-type]
    return Bnb4Source(f"{module}.weight", packed, absmax, need("weight.quant_map"),
                      need("weight.nested_absmax") if nested else None,
                      need("weight.nested_quant_map") if nested else None, quant_type, blocksize, shape, dtype,
                      nested_blocksize, float(state.get("nested_offset", 0.0)) if nested else 0.0)  # type: ignore[arg-type]


# --- encoding ------------------------------------------------------------------------------------------------
# bitsandbytes 0.50's 4-bit quantizer on the CPU is its PyTorch default kernel (per-block absmax, values times
# the reciprocal, bucketized by the midpoints of the sorted code); the nested absmax quantization is its C
# kernel, which looks codes up in a 65536-bin table. Both are reproduced here bit for bit (tests compare with
# bitsandbytes itself); what CUDA kernels would produce can differ by one code step for rare values.

NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)
FP4 = (0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
NESTED_BLOCKSIZE = 256
_LUT_SIZE = 65536


def four_bit_code(quant_type: str) -> torch.Tensor:
    code = torch.tensor(NF4 if quant_type == "nf4" else FP4, dtype=torch.float32)
    return code / code.abs().max()


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit map (`create_dynamic_map(signed=True)`), sorted."""
    data: list[float] = []
    max_exponent_bits, non_sign_bits = 7, 7
    for i in range(max_exponent_bits):
        items = 2 ** (i + non_sign_bits - max_exponent_bits) + 1
        boundaries = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data += [0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)


def _lookup_table(code: torch.Tensor) -> torch.Tensor:
    """The C kernel's table: for each of 65536 bins over [-1, 1], the code whose midpoint interval holds it."""
    midpoints = 0.5 * (code[:-1] + code[1:])
    bins = -1.0 + (2.0 * torch.arange(_LUT_SIZE, dtype=torch.float32)) / (_LUT_SIZE - 1)
    return torch.searchsorted(midpoints, bins, side="left").to(torch.uint8)


# torch's intra-op threads when lorastream was imported: what bitsandbytes runs with in a default process
DEFAULT_THREADS = torch.get_num_threads()


def mean_as_default_process(values: torch.Tensor) -> torch.Tensor:
    """`values.mean()` in float32 as a process with torch's default threads computes it.

    A parallel sum's rounding depends on how many threads split it (tensors over 32768 elements), and the
    engine runs torch with fewer threads (and its reader thread with whatever it inherited), so the double
    quantization offset would change with timing and machine load instead of matching bitsandbytes.
    """
    threads = torch.get_num_threads()
    if threads == DEFAULT_THREADS:
        return values.mean()
    torch.set_num_threads(DEFAULT_THREADS)
    try:
        return values.mean()
    finally:
        torch.set_num_threads(threads)


def quantize_nested(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Double quantization of per-block absmax: (uint8 codes, float32 absmax per 256 blocks, offset)."""
    offset = mean_as_default_process(absmax)
    values = absmax - offset
    blocks = math.ceil(values.numel() / NESTED_BLOCKSIZE)
    padded = torch.nn.functional.pad(values, (0, blocks * NESTED_BLOCKSIZE - values.numel())).view(blocks, -1)
    nested_absmax = padded.abs().max(dim=1).values
    scaled = (padded * (1.0 / nested_absmax).view(-1, 1)).clamp(-1, 1)
    bins = (((scaled + 1.0) * 0.5) * (_LUT_SIZE - 1) + 0.5).to(torch.int64)
    codes = _lookup_table(dynamic_map())[bins]
    codes[nested_absmax == 0] = 0
    return codes.reshape(-1)[: values.numel()].contiguous(), nested_absmax, offset.item()


@dataclass(frozen=True)
class Bnb4Encoding:
    """Write a weight as bitsandbytes 4-bit: packed nibbles plus statistics, as transformers serializes it."""

    quant_type: str
    double_quant: bool
    compute_dtype: torch.dtype
    blocksize: int = 64

    def row_alignment(self, row_elements: int) -> int:
        return self.blocksize // math.gcd(row_elements, self.blocksize)

    # the scaled float32 copy (4), its int64 bucket indices (8), the uint8 codes and packed bytes (1.5)
    encode_bytes_per_element = 14

    def state_bytes(self, numel: int) -> int:
        """Float32 absmax of the whole tensor, kept until its statistics are written."""
        return math.ceil(numel / self.blocksize) * 8

    def specs(self, name: str, shape: tuple[int, ...]) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        numel = math.prod(shape)
        blocks = math.ceil(numel / self.blocksize)
        specs = [(name, torch.uint8, ((numel + 1) // 2, 1)),
                 (f"{name}.absmax", torch.uint8 if self.double_quant else torch.float32, (blocks,)),
                 (f"{name}.quant_map", torch.float32, (16,))]
        if self.double_quant:
            specs += [(f"{name}.nested_absmax", torch.float32, (math.ceil(blocks / NESTED_BLOCKSIZE),)),
                      (f"{name}.nested_quant_map", torch.float32, (256,))]
        specs.append((f"{name}.quant_state.bitsandbytes__{self.quant_type}", torch.uint8,
                      (len(self.state_json(shape, None)),)))
        return specs

    def state_json(self, shape: tuple[int, ...], offset: float | None) -> bytes:
        """bitsandbytes' quant state JSON; its length is fixed before the offset is known by padding with
        spaces (JSON whitespace) to the longest float repr."""
        state: dict[str, object] = {"quant_type": self.quant_type, "blocksize": self.blocksize,
                                    "dtype": "float32", "shape": list(shape)}
        if self.double_quant:
            state.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=0.0)
        longest = len(json.dumps(state)) - len("0.0") + len(repr(-2.2250738585072014e-308))
        if self.double_quant and offset is not None:
            state["nested_offset"] = offset
        return json.dumps(state).encode().ljust(longest)

    def encoder(self, shape: tuple[int, ...]) -> Bnb4Encoder:
        return Bnb4Encoder(self, shape)


class Quantizer4:
    """bitsandbytes' 4-bit quantization of float32 values into packed codes, block by block."""

    def __init__(self, quant_type: str, blocksize: int):
        self.code = four_bit_code(quant_type)
        self.blocksize = blocksize
        self._order = torch.argsort(self.code)
        self._bounds = (self.code[self._order[:-1]] + self.code[self._order[1:]]) / 2

    def quantize(self, values: torch.Tensor, out: torch.Tensor) -> tuple[int, torch.Tensor]:
        """Pack the codes of `values` (whose first element starts a block) into uint8 `out`: (bytes written,
        float32 absmax per block)."""
        return kernels.quantize_4bit(values, self._bounds, self._order, self.blocksize, out)


def dequantize_nested(codes: torch.Tensor, nested_absmax: torch.Tensor, offset: float, nested_code: torch.Tensor,
                      first_block: int = 0, nested_blocksize: int = NESTED_BLOCKSIZE) -> torch.Tensor:
    """Per-block absmax back from double quantization, as bitsandbytes' `dequantize_4bit` computes it:
    `nested_code[codes] * nested_absmax[block // 256]`, then `+= offset`, in float32."""
    blocks = torch.arange(first_block, first_block + codes.numel()) // nested_blocksize
    absmax = nested_code[codes.long()] * nested_absmax[blocks]
    absmax += offset
    return absmax


class Bnb4Encoder:
    """Quantizes one tensor block by block (blocks start on quantization blocks) and then its statistics."""

    def __init__(self, encoding: Bnb4Encoding, shape: tuple[int, ...]):
        self.encoding, self.shape = encoding, shape
        self.quantizer = Quantizer4(encoding.quant_type, encoding.blocksize)
        self._code = self.quantizer.code
        self._absmax: list[torch.Tensor] = []

    def encode(self, values: torch.Tensor, out: torch.Tensor) -> int:
        """Quantize float32 `values` (a block of rows) into `out` (uint8); returns the bytes written."""
        count, absmax = self.quantizer.quantize(values, out)
        self._absmax.append(absmax.cpu())  # the statistics are computed on the host
        return count

    def statistics(self) -> list[bytes]:
        """The bytes of every tensor after the packed weight, in `Bnb4Encoding.specs` order."""
        absmax = torch.cat(self._absmax)
        self._absmax = []
        tensors: list[torch.Tensor] = []
        offset = None
        if self.encoding.double_quant:
            codes, nested_absmax, offset = quantize_nested(absmax)
            tensors = [codes, self._code, nested_absmax, dynamic_map()]
        else:
            tensors = [absmax, self._code]
        state = self.encoding.state_json(self.shape, offset)
        return [tensor_bytes(t) for t in tensors] + [state]


def tensor_bytes(tensor: torch.Tensor) -> bytearray:
    """A tensor's raw bytes, copied without a round trip through Python objects."""
    raw = tensor.contiguous().view(torch.uint8).reshape(-1)
    buffer = bytearray(raw.numel())
    if raw.numel():
        torch.frombuffer(buffer, dtype=torch.uint8).copy_(raw)
    return buffer


@dataclass
class RoundTripSource(SameGeometry):
    """A dense weight seen through bitsandbytes 4-bit, `dequantize(quantize(W))`: what a QLoRA adapter was
    trained against. Double quantization needs every block's absmax first, so then the first read makes one
    pass over the tensor to collect them (numel / blocksize floats); without it each row block stands alone.
    `round_to` rounds the decoded values to another dtype (LitGPT merges in the LoRA weights' dtype)."""

    inner: Source
    encoding: Bnb4Encoding
    round_to: torch.dtype | None = None
    _absmax: torch.Tensor | None = None
    uses_kernels = True

    @property
    def _geometry(self) -> Source:
        return self.inner

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def dtype(self) -> torch.dtype:
        return self.round_to or self.inner.dense_dtype

    @property
    def dense_dtype(self) -> torch.dtype:
        return self.dtype

    @property
    def stored_bytes(self) -> int:
        return self.inner.stored_bytes

    @property
    def row_alignment(self) -> int:
        return math.lcm(self.inner.row_alignment, self.encoding.row_alignment(self.row_elements))

    @property
    def decode_bytes_per_element(self) -> int:
        return self.inner.decode_bytes_per_element + Bnb4Source.decode_bytes_per_element + 4

    @property
    def buffer_bytes_per_element(self) -> int:
        """The inner block, then its float32 values, their packed codes and the decoded result."""
        return self.inner.buffer_bytes_per_element + 4 + 1 + self.inner.dense_dtype.itemsize

    @property
    def resident_bytes(self) -> int:
        """With double quantization, the whole tensor's block absmax, kept while it is read (and its copy while
        it is built)."""
        return math.ceil(self.numel / self.encoding.blocksize) * 8 if self.encoding.double_quant else 0

    def _nested_absmax(self, buffer: memoryview) -> torch.Tensor:
        """Every block's absmax as double quantization rounds it: one pass over the tensor, at its first read."""
        if self._absmax is None:
            row_bytes = max(1, self.row_elements * self.inner.decode_bytes_per_element)
            step = max(self.row_alignment, len(buffer) // row_bytes)
            step -= step % self.row_alignment
            absmax = torch.cat([kernels.block_absmax(self.inner.read_rows(start, min(start + step, self.rows),
                                                                          buffer).float(), self.encoding.blocksize)
                                for start in range(0, self.rows, step)])
            codes, nested_absmax, offset = quantize_nested(absmax)
            self._absmax = dequantize_nested(codes, nested_absmax, offset, dynamic_map())
        return self._absmax

    def read_rows(self, start: int, stop: int, buffer: memoryview, device: torch.device = CPU) -> torch.Tensor:
        nested = self._nested_absmax(buffer) if self.encoding.double_quant else None
        quantizer = Quantizer4(self.encoding.quant_type, self.encoding.blocksize)
        rows = self.inner.read_rows(start, stop, buffer, device)
        count = rows.numel()
        host = buffer if device == CPU else None
        values, end = buffer_region(host, count * self.inner.buffer_bytes_per_element, count, torch.float32)
        packed, end = buffer_region(host, end, (count + 1) // 2, torch.uint8)
        decoded, _ = buffer_region(host, end, count, self.inner.dense_dtype)
        values = rows.float() if values is None else values.view(rows.shape).copy_(rows)
        if packed is None:
            packed = torch.empty((count + 1) // 2, dtype=torch.uint8, device=values.device)
        _, absmax = quantizer.quantize(values, packed)
        if nested is not None:
            first_block = start * self.row_elements // self.encoding.blocksize
            absmax = nested[first_block:first_block + len(absmax)]
        decoded = kernels.decode_4bit(packed, quantizer.code.to(device), absmax.to(device), self.encoding.blocksize,
                                      count, self.inner.dense_dtype, decoded)
        return decoded.to(self.dtype).view(rows.shape)
