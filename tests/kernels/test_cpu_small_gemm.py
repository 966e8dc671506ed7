"""kernels/cpu/small_gemm.c (float32 GEMMs of a few rows through weight panels) against a float64
product: every tile height, partial panels, strided rows, bias."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.cpu import small_gemm
from tests.kernels.common import require_cpu_kernel


@pytest.fixture(autouse=True)
def built() -> None:
    require_cpu_kernel("small_gemm")
    if not small_gemm.available():
        pytest.skip("small_gemm has a path for AVX2 CPUs without AVX-512 only")


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Within the bound on summing K float32 products in any order: K u sum(|terms|)."""
    got = small_gemm.linear(x, small_gemm.pack(weight), weight.shape[0], bias)
    exact = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    size = F.linear(x.abs().double(), weight.abs().double(),
                    None if bias is None else bias.abs().double())
    assert got.shape == exact.shape and got.dtype == torch.float32
    assert ((got.double() - exact).abs() <= (x.shape[1] + 1) * 2.0**-24 * size).all()


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 13, 24, 48])  # every tile height, mixes,
# and 2-4 passes (those prefetch the next panel)
@pytest.mark.parametrize(("out_features", "in_features"), [(96, 64), (300, 768), (5, 7)])
def test_within_float32_rounding_of_float64(rows, out_features, in_features) -> None:
    weight = torch.randn(out_features, in_features)
    _check(torch.randn(rows, in_features), weight, None)
    _check(torch.randn(rows, in_features), weight, torch.randn(out_features))


def test_strided_rows_columns_and_bias() -> None:
    weight = torch.randn(40, 64)
    _check(torch.randn(9, 100)[:, 10:74], weight, None)
    _check(torch.randn(9, 128)[:, ::2], weight, None)  # strided columns: copied first
    _check(torch.randn(9, 64), weight, torch.randn(80)[::2])  # a strided bias: copied first


def test_other_dtypes_are_not_packed() -> None:
    assert small_gemm.pack(torch.randn(8, 8).bfloat16()) is None
    assert small_gemm.pack(torch.randn(8, 8, device="meta")) is None
