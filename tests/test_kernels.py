"""Both kernel paths (compiled numba loops and the torch formulation) against bitsandbytes itself.

Shapes: an inner dimension that is a multiple of 64, one that is not (several double-quantization blocks of
256), and an odd element count (a partial last block and a padded last byte). bitsandbytes 0.50's native CPU
4-bit dequantization is wrong when the inner dimension is not a multiple of 64, so there the reference is its
default (pure torch) backend's kernel, `_dequantize_4bit_compute`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

from lorastream import codecs
from lorastream.codecs import bnb4, kernels
from lorastream.codecs.bnb4 import Quantizer4

SHAPES = [(64, 128), (300, 200), (7, 37)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.fixture(params=["numba", "torch"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv(kernels.ENV, request.param)
    kernels.compiled.cache_clear()
    assert (kernels.compiled() is not None) == (request.param == "numba")
    yield request.param
    kernels.compiled.cache_clear()


def weight(shape: tuple[int, int], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    values = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.02
    values[0, :5] = torch.tensor([0.0, 1e-8, -0.3, 0.3, -0.0])  # a zero, a tiny value, large ones
    return values.to(dtype)


def bnb_dequantize(packed: torch.Tensor, state: bnb.functional.QuantState) -> torch.Tensor:
    if state.shape[-1] % 64 == 0:
        return bnb.functional.dequantize_4bit(packed, state)
    absmax = state.absmax
    if state.nested:
        absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return _dequantize_4bit_compute(packed.view(torch.uint8).reshape(-1), absmax.float(), state.code,
                                    state.blocksize, state.shape, state.dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("quant_type", "double_quant"), [("nf4", True), ("nf4", False), ("fp4", True)])
def test_4bit_decode_equals_bitsandbytes(path: str, shape: tuple[int, int], dtype: torch.dtype, quant_type: str,
                                         double_quant: bool) -> None:
    packed, state = bnb.functional.quantize_4bit(weight(shape, dtype), blocksize=64, quant_type=quant_type,
                                                 compress_statistics=double_quant)
    absmax = state.absmax
    if double_quant:
        absmax = bnb4.dequantize_nested(state.absmax, state.state2.absmax, state.offset, state.state2.code)
        assert torch.equal(absmax, bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset)
    numel = shape[0] * shape[1]
    ours = kernels.decode_4bit(packed.view(-1), state.code, absmax, 64, numel, dtype)
    assert ours.dtype == dtype
    assert torch.equal(ours.view(shape), bnb_dequantize(packed, state))
    # a run of whole blocks from the middle decodes to the same values
    first, count = 128, min(numel - 128, 640)
    part = kernels.decode_4bit(packed.view(-1)[first // 2:(first + count + 1) // 2], state.code,
                               absmax[first // 64:], 64, count, dtype)
    assert torch.equal(part, ours[first:first + count])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("quant_type", "double_quant"), [("nf4", True), ("nf4", False), ("fp4", True),
                                                          ("fp4", False)])
def test_4bit_quantize_equals_bitsandbytes(path: str, shape: tuple[int, int], dtype: torch.dtype, quant_type: str,
                                           double_quant: bool) -> None:
    """The merge quantizes float32 values (here drawn in each compute dtype)."""
    values = weight(shape, dtype, seed=1).float()
    packed, state = bnb.functional.quantize_4bit(values, blocksize=64, quant_type=quant_type,
                                                 compress_statistics=double_quant)
    out = torch.full((packed.numel() + 8,), 0xAB, dtype=torch.uint8)
    nbytes, absmax = Quantizer4(quant_type, 64).quantize(values, out)
    assert nbytes == packed.numel()
    assert torch.equal(out[:nbytes], packed.view(-1))
    assert (out[nbytes:] == 0xAB).all()  # nothing written past the packed bytes
    if double_quant:
        codes, nested_absmax, offset = bnb4.quantize_nested(absmax)
        assert torch.equal(codes, state.absmax) and torch.equal(nested_absmax, state.state2.absmax)
        assert offset == state.offset.item()
    else:
        assert torch.equal(absmax, state.absmax)


@pytest.mark.parametrize("threads", [2, 3])
def test_4bit_quantize_split_over_threads_equals_bitsandbytes(path: str, threads: int,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled quantizer splits a block's quantization blocks over the merge's threads: the same bytes, with
    the partial last block and the padded last byte (an odd count) in the last part."""
    monkeypatch.setattr(kernels, "_PARALLEL_BLOCKS", 64)
    values = weight((1031, 129), torch.float32, seed=2)
    packed, state = bnb.functional.quantize_4bit(values, blocksize=64, quant_type="nf4", compress_statistics=False)
    out = torch.full((packed.numel() + 8,), 0xAB, dtype=torch.uint8)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        nbytes, absmax = Quantizer4("nf4", 64).quantize(values, out)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(out[:nbytes], packed.view(-1)) and (out[nbytes:] == 0xAB).all()
    assert torch.equal(absmax, state.absmax)


@pytest.mark.parametrize("threads", [1, 2])
def test_q8_0_equals_gguf_py(threads: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled Q8_0 quantizer against gguf-py's (what `convert_hf_to_gguf.py --outtype q8_0` runs): a zero
    block, exact halves (rounded away from zero), a value just under a half, a tiny block (float16 subnormal
    scale), and blocks split over threads."""
    import gguf

    monkeypatch.setattr(kernels, "_PARALLEL_BLOCKS", 4)
    values = weight((64, 96), torch.float32, seed=3)
    values[1] = 0.0
    values[2, :32] = torch.arange(-16, 16) + 0.5
    values[2, 0] = 127.0  # d = 1: the block's other values, -15.5 ... 15.5, are exact halves once scaled
    values[2, 32:64] = torch.tensor(0.49999997).repeat(32) * torch.tensor([1.0, -1.0]).repeat(16)
    values[3] = 1e-6 * torch.randn(96, generator=torch.Generator().manual_seed(4))
    out = torch.full((64 * 3 * 34 + 8,), 0xAB, dtype=torch.uint8)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        nbytes = kernels.quantize_q8_0(values, out)
    finally:
        torch.set_num_threads(previous)
    expected = gguf.quants.quantize(values.numpy(), gguf.GGMLQuantizationType.Q8_0)
    assert nbytes == expected.nbytes
    assert torch.equal(out[:nbytes], torch.from_numpy(expected.reshape(-1))) and (out[nbytes:] == 0xAB).all()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_quantize_equals_bitsandbytes(path: str, shape: tuple[int, int], dtype: torch.dtype) -> None:
    values = weight(shape, dtype, seed=2).float()
    values[2] = 0.0  # a zero row
    values[3, 0] = 70000.0  # beyond float16's range (inf there)
    codes, row_stats, _ = bnb.functional.int8_vectorwise_quant(values.to(torch.float16))
    out = torch.zeros(values.numel(), dtype=torch.uint8)
    assert torch.equal(kernels.quantize_int8(values, out), row_stats)
    assert torch.equal(out.view(torch.int8).view(shape), codes)


def test_the_choice_is_logged_once_and_follows_the_environment(monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="lorastream")
    try:
        for choice, expected in [("numba", "compiled (numba "), ("torch", "torch (LORASTREAM_KERNELS=torch)"),
                                 ("auto", "compiled (numba ")]:
            monkeypatch.setenv(kernels.ENV, choice)
            kernels.compiled.cache_clear()
            caplog.clear()
            kernels.compiled()
            kernels.compiled()
            assert len(caplog.records) == 1
            assert caplog.records[0].getMessage().startswith(f"codec kernels: {expected}")
        # numba not installed: the torch path, said so
        monkeypatch.setitem(sys.modules, "numba", None)
        monkeypatch.delitem(sys.modules, "lorastream.codecs.numba_kernels")
        monkeypatch.delattr(codecs, "numba_kernels")
        monkeypatch.setenv(kernels.ENV, "auto")
        kernels.compiled.cache_clear()
        assert kernels.compiled() is None
        assert caplog.records[-1].getMessage().startswith("codec kernels: torch (numba is not installed")
        monkeypatch.setenv(kernels.ENV, "numba")  # insisted on: the import error
        kernels.compiled.cache_clear()
        with pytest.raises(ImportError):
            kernels.compiled()
        monkeypatch.setenv(kernels.ENV, "fast")
        kernels.compiled.cache_clear()
        with pytest.raises(ValueError, match="LORASTREAM_KERNELS='fast'"):
            kernels.compiled()
    finally:
        kernels.compiled.cache_clear()
