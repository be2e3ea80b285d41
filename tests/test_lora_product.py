"""The LoRA product's grouped float32 sums are bit for bit `torch.mm` in bfloat16 and float16."""

from __future__ import annotations

import pytest
import torch

from lorastream import lora_product
from lorastream.lora_product import lora_mm


def _torch_has_its_own_fast_kernel(dtype: torch.dtype) -> bool:
    check = {torch.bfloat16: torch.ops.mkldnn._is_mkldnn_bf16_supported,
             torch.float16: torch.ops.mkldnn._is_mkldnn_fp16_supported}[dtype]
    return torch.backends.mkldnn.is_available() and check()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_grouped_sums_are_used_where_torch_computes_with_its_scalar_kernel(dtype: torch.dtype) -> None:
    assert lora_product._matches_torch(dtype) is not _torch_has_its_own_fast_kernel(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rank", [1, 3, 4, 7, 8, 16, 33, 64, 128])
def test_lora_mm_equals_torch_mm(dtype: torch.dtype, rank: int) -> None:
    generator = torch.Generator().manual_seed(rank)
    for rows, cols in [(300, 1100), (1100, 300), (2, 5000)]:  # 5000 columns: more than one row per step
        b = (torch.randn(rows, rank, generator=generator) * 0.02).to(dtype)
        a = torch.randn(rank, cols, generator=generator).to(dtype)
        b[::4] = 0  # an untrained LoRA's B is zero: every product a signed zero
        for right in (a, a[:, 7:cols // 2]):  # a transposed delta multiplies a column slice of A
            expected = torch.mm(b, right)
            got = lora_mm(b, right, torch.empty_like(expected))
            assert torch.equal(got.view(torch.int16), expected.view(torch.int16))


def test_float32_and_accelerator_products_are_torch_mm() -> None:
    b, a = torch.randn(9, 4), torch.randn(4, 11)
    assert torch.equal(lora_mm(b, a, torch.empty(9, 11)), torch.mm(b, a))
