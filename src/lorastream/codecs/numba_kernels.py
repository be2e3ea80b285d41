"""The compiled path of the codec kernels: numba loops over numpy views of torch tensors, one core, no GIL.

Each loop reproduces, element by element, the float32 arithmetic of the torch formulation in `kernels.py` (and so
bitsandbytes'): the same products, the same correctly rounded reciprocals and divisions, the same
round-to-nearest-even casts (done here on the bits: numba has neither bfloat16 nor float16 on the CPU). No
`fastmath`: reassociating or contracting these operations would change the last bit.

Compiled machine code is cached on disk (`cache=True`) in a per-user folder, so only the first run on a machine
pays for compiling; importing this module (numba, llvmlite) is the cost every run pays.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("NUMBA_CACHE_DIR", str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                                             / "lorastream" / "numba"))

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

_jit = numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")  # IEEE division: x / 0 = inf


@intrinsic
def _bits(typingctx, value):  # type: ignore[no-untyped-def]
    """The IEEE bits of a float32 as a uint32 (a register bitcast, no memory)."""
    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(types.float32), codegen


@intrinsic
def _float(typingctx, bits):  # type: ignore[no-untyped-def]
    """The float32 whose IEEE bits are the uint32 `bits`."""
    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.uint32), codegen


@_jit
def _to_bfloat16(value: np.float32) -> np.uint16:
    """Round to nearest even, as torch's float -> bfloat16 cast (NaN -> the canonical quiet NaN)."""
    if value != value:
        return np.uint16(0x7FC0)
    bits = _bits(value)
    return np.uint16((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


@_jit
def _to_float16(value: np.float32) -> np.uint16:
    """IEEE float32 -> float16 bits, round to nearest even (subnormals, overflow to inf, NaN kept quiet)."""
    bits = _bits(value)
    sign = (bits >> np.uint32(16)) & np.uint32(0x8000)
    bits &= np.uint32(0x7FFFFFFF)
    if bits >= np.uint32(0x47800000):  # >= 65536 (after rounding, anything from 65520 up is inf): inf or NaN
        half = np.uint32(0x7E00) if bits > np.uint32(0x7F800000) else np.uint32(0x7C00)
    elif bits < np.uint32(0x38800000):  # below float16's smallest normal: let the FPU round into a subnormal
        magic = np.float32(0.5)  # 2**-1: adding it puts the subnormal's bits in the low mantissa bits, rounded
        half = _bits(_float(bits) + magic) - _bits(magic)
    else:
        odd = (bits >> np.uint32(13)) & np.uint32(1)
        bits += np.uint32(0xC8000FFF) + odd  # rebias the exponent (-112 << 23) and round to nearest even
        half = bits >> np.uint32(13)
    return np.uint16(half | sign)


@_jit
def _from_float16(half: np.uint32) -> np.float32:
    """float16 bits -> float32, exact (normals, subnormals, inf, NaN)."""
    magnitude = (half & np.uint32(0x7FFF)) << np.uint32(13)
    value = _float(magnitude) * np.float32(5.192296858534828e33)  # 2**112 moves the exponent bias, exactly
    if value >= np.float32(65536.0):
        value = _float(_bits(value) | np.uint32(0x7F800000))
    return _float(_bits(value) | ((half & np.uint32(0x8000)) << np.uint32(16)))


@_jit
def _store(out, index, value, mode):  # type: ignore[no-untyped-def]
    """out[index] = value cast by `mode`: 0 float32, 1 bfloat16 bits, 2 float16 bits."""
    if mode == 0:
        out[index] = value
    elif mode == 1:
        out[index] = _to_bfloat16(value)
    else:
        out[index] = _to_float16(value)


@_jit
def decode_4bit(packed, code, absmax, blocksize, count, out, mode):  # type: ignore[no-untyped-def]
    """out[i] = cast(code[nibble i] * absmax[i // blocksize]) for i < count, the high nibble of a byte first.
    A block's 16 possible results are computed (and cast) once; its values are then looked up."""
    table = np.empty(16, out.dtype)
    for block in range((count + blocksize - 1) // blocksize):
        scale = absmax[block]
        for k in range(16):
            _store(table, k, code[k] * scale, mode)
        first = block * blocksize  # even: blocksize is
        stop = min(first + blocksize, count)
        for i in range(first >> 1, stop >> 1):
            byte = packed[i]
            out[2 * i] = table[byte >> 4]
            out[2 * i + 1] = table[byte & 15]
        if stop % 2:  # the tensor ends on a high nibble
            out[stop - 1] = table[packed[stop >> 1] >> 4]


@_jit
def _bucket(scaled, bounds):  # type: ignore[no-untyped-def]
    """torch.bucketize(scaled, bounds): how many of the 15 sorted `bounds` (a tuple) are below `scaled` (a tie
    goes low). Clamping to [-1, 1] first, as bitsandbytes does, changes no count: every bound is inside.
    Spelled out: a loop over a tuple is not unrolled, and this sum is what the block loops vectorize."""
    b = bounds
    return (np.int32(scaled > b[0]) + np.int32(scaled > b[1]) + np.int32(scaled > b[2]) + np.int32(scaled > b[3])
            + np.int32(scaled > b[4]) + np.int32(scaled > b[5]) + np.int32(scaled > b[6])
            + np.int32(scaled > b[7]) + np.int32(scaled > b[8]) + np.int32(scaled > b[9])
            + np.int32(scaled > b[10]) + np.int32(scaled > b[11]) + np.int32(scaled > b[12])
            + np.int32(scaled > b[13]) + np.int32(scaled > b[14]))


@_jit
def quantize_4bit(values, bounds, pair_codes, blocksize, packed, absmax):  # type: ignore[no-untyped-def]
    """bitsandbytes' 4-bit quantization of float32 `values`: per block absmax (float32, into `absmax`), values
    times its float32 reciprocal (the tensor's last, partial block: divided by its absmax clamped to 1e-38),
    bucketed by the 15 `bounds`, two buckets to a byte (high nibble first; an odd count is padded with the
    bucket of 0.0) and each byte mapped through `pair_codes` (bucket pair -> code pair) into `packed`."""
    count = values.shape[0]
    magnitude = values.view(np.uint32)
    b = (bounds[0], bounds[1], bounds[2], bounds[3], bounds[4], bounds[5], bounds[6], bounds[7], bounds[8],
         bounds[9], bounds[10], bounds[11], bounds[12], bounds[13], bounds[14])
    tiny = np.float32(1e-38)
    buckets = np.empty(blocksize + 1, np.int32)
    for block in range(absmax.shape[0]):
        first = block * blocksize
        size = min(blocksize, count - first)
        peak = np.uint32(0)  # max |x| on the bits: for floats of one sign their order is the integers' order
        for i in range(first, first + size):
            peak = max(peak, magnitude[i] & np.uint32(0x7FFFFFFF))
        scale = _float(peak)
        if size == blocksize:
            absmax[block] = scale
            inverse = np.float32(1.0) / max(scale, tiny)
            for i in range(blocksize):
                buckets[i] = _bucket(values[first + i] * inverse, b)
        else:
            scale = max(scale, tiny)
            absmax[block] = scale
            for i in range(size):
                buckets[i] = _bucket(values[first + i] / scale, b)
            buckets[size] = _bucket(np.float32(0.0), b)
        for i in range(0, size, 2):
            packed[(first + i) >> 1] = (buckets[i] << 4) | buckets[i + 1]
    for i in range(packed.shape[0]):
        packed[i] = pair_codes[packed[i]]


@_jit
def quantize_int8(values, quantized, row_stats):  # type: ignore[no-untyped-def]
    """bitsandbytes' `int8_vectorwise_quant` of `values` [rows, cols] rounded to float16: per row
    `stat = max|x|` (float32), `q = round(x * (127 * (1 / stat)))` to nearest even, as int8."""
    rows, cols = values.shape
    for row in range(rows):
        peak = np.float32(0.0)
        for col in range(cols):
            peak = max(peak, abs(_from_float16(_to_float16(values[row, col]))))
        row_stats[row] = peak
        factor = (np.float32(1.0) / peak) * np.float32(127.0)
        for col in range(cols):
            scaled = _from_float16(_to_float16(values[row, col])) * factor
            # torch casts NaN (0 * inf: a zero row, or inf in a row) to 0
            quantized[row, col] = np.int8(0) if scaled != scaled else np.int8(np.rint(scaled))


@_jit
def quantize_q8_0(values, out):  # type: ignore[no-untyped-def]
    """ggml's Q8_0 of float32 `values` (whole blocks of 32) into `out` (34 bytes a block), as
    `quantize_row_q8_0_ref` and gguf-py compute it: `d = max|x| / 127` (stored float16), `q = roundf(x * (1 / d))`
    (halves away from zero; 0 for a zero block), with gguf-py's `np_roundf` arithmetic in float32."""
    for block in range(values.shape[0] // 32):
        first = block * 32
        peak = np.float32(0.0)
        for i in range(32):
            peak = max(peak, abs(values[first + i]))
        d = peak / np.float32(127.0)
        inverse = np.float32(1.0) / d if d != np.float32(0.0) else np.float32(0.0)
        half = _to_float16(d)
        at = block * 34
        out[at] = np.uint8(half & np.uint16(0xFF))
        out[at + 1] = np.uint8(half >> np.uint16(8))
        for i in range(32):
            scaled = values[first + i] * inverse
            magnitude = abs(scaled)
            floored = np.floor(magnitude)
            rounded = floored + np.floor(np.float32(2.0) * (magnitude - floored))
            code = np.int32(rounded)
            out[at + 2 + i] = np.uint8((-code if scaled < 0 else code) & 0xFF)  # int8, two's complement
