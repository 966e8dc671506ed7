"""The CPU backend's SiLU-and-mul (kernels/cpu/activation.c) against float64 and the reference."""

from __future__ import annotations

import pytest
import torch

from pagedserve.kernels import reference
from pagedserve.kernels.cpu import silu_and_mul
from tests.kernels.common import require_cpu_kernel


@pytest.fixture(autouse=True)
def built() -> None:
    require_cpu_kernel("activation")


def _float64(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    g, u = x.double()[..., :d], x.double()[..., d:]
    return g * torch.sigmoid(g) * u


@pytest.mark.parametrize("rows", [1, 7, 300])  # 300 x 2048: over the threshold, split over threads
@pytest.mark.parametrize("d", [2048, 24, 13])  # 24, 13: vector tails, the scalar loop
def test_float32_within_rounding_of_float64(rows, d) -> None:
    x = torch.randn(rows, 2 * d) * 4
    x[0, :6] = torch.tensor([0.0, -0.0, 30.0, -30.0, 100.0, -100.0])
    out = silu_and_mul(x)
    assert out.shape == (rows, d) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _float64(x), rtol=4e-7, atol=1e-30)


@pytest.mark.parametrize("rows", [3, 300])
def test_bfloat16_rounds_like_the_reference(rows) -> None:
    """silu(gate) rounded to bf16, then times up, rounded: the reference's two roundings. The
    float32 silu before the first rounding differs in its last places, so a value sitting on a
    rounding boundary may land one bf16 step away; nothing further."""
    x = (torch.randn(rows, 2 * 2048) * 4).bfloat16()
    out, ref = silu_and_mul(x), reference.silu_and_mul(x)
    steps = (out.view(torch.int16).int() - ref.view(torch.int16).int()).abs()
    assert int(steps.max()) <= 1 and float((steps > 0).float().mean()) < 1e-3


def test_rows_further_apart_than_their_width() -> None:
    wide = torch.randn(9, 2 * 64 + 5)
    x = wide[:, : 2 * 64]
    torch.testing.assert_close(silu_and_mul(x).double(), _float64(x), rtol=4e-7, atol=1e-30)


def test_nan_stays_nan_and_other_layouts_go_to_the_reference() -> None:
    x = torch.randn(2, 32)
    x[1, 3] = float("nan")
    assert torch.isnan(silu_and_mul(x)[1, 3]) and not torch.isnan(silu_and_mul(x)[0]).any()
    three_d = torch.randn(2, 3, 32)
    assert torch.equal(silu_and_mul(three_d), reference.silu_and_mul(three_d))
    half = torch.randn(4, 32).half()
    assert torch.equal(silu_and_mul(half), reference.silu_and_mul(half))


@pytest.mark.parametrize("flags", [("-mno-avx512f",), ("-mno-avx2", "-mno-avx512f")],
                         ids=["avx2", "portable"])
def test_narrower_simd_paths(monkeypatch, flags) -> None:
    from pagedserve.kernels.cpu import activation, build

    lib, why = build.load("activation", flags)
    if lib is None:
        pytest.skip(why)
    suffix = {torch.float32: "f32", torch.bfloat16: "bf16"}
    monkeypatch.setattr(activation, "typed_function",
                        lambda name, symbol, dtype: getattr(lib, f"{symbol}_{suffix[dtype]}"))
    x = torch.randn(5, 2 * 40) * 4
    torch.testing.assert_close(silu_and_mul(x).double(), _float64(x), rtol=4e-7, atol=1e-30)
    xb = x.bfloat16()
    steps = (silu_and_mul(xb).view(torch.int16).int()
             - reference.silu_and_mul(xb).view(torch.int16).int()).abs()
    assert int(steps.max()) <= 1
