"""gelu_tanh_and_mul (Gemma's gated MLP) in every backend against an independent formula: torch's
F.gelu(approximate="tanh") in float64, times up.

The form 0.5 g (1 + tanh(u)) cancels for very negative g: torch's float32 reference loses up to
about ulp(1) * |g * up| there (a few 1e-6 at these inputs), and float64 gives 0 below about -6
where the kernels' g * sigmoid(2u) keeps values of order 1e-20: the absolute tolerance covers
both."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pagedserve.kernels import reference
from tests.kernels.common import DEVICE, require_cpu_kernel


def _float64(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    g, u = x.double()[..., :d], x.double()[..., d:]
    return F.gelu(g, approximate="tanh") * u


def _inputs(rows: int, d: int, dtype: torch.dtype, device=DEVICE) -> torch.Tensor:
    x = torch.randn(rows, 2 * d) * 4
    x[0, :6] = torch.tensor([0.0, -0.0, 12.0, -12.0, 100.0, -100.0])[: min(6, d)]
    return x.to(dtype=dtype, device=device)


def _check(out: torch.Tensor, x: torch.Tensor) -> None:
    """float32 within a few ulp of float64; bf16/fp16 within the two roundings to the dtype
    (gelu(g), then the product)."""
    d = x.shape[-1] // 2
    assert out.shape == (*x.shape[:-1], d) and out.dtype == x.dtype
    rtol = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[x.dtype]
    atol = 1e-5 if x.dtype == torch.float32 else 1e-4
    torch.testing.assert_close(out.double().cpu(), _float64(x.cpu()), rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, d", [(1, 24), (7, 13), (300, 2048)])
def test_reference(rows, d, dtype) -> None:
    x = _inputs(rows, d, dtype, device="cpu")
    _check(reference.gelu_tanh_and_mul(x), x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, d", [(1, 2048), (7, 24), (3, 13), (300, 2048)])
def test_cpu(rows, d, dtype) -> None:
    """The C kernel: vector body, vector tail and scalar loop (13), and the threaded split (300
    rows of 2048); bf16 at most one rounding step from the reference."""
    require_cpu_kernel("activation")
    from pagedserve.kernels.cpu import gelu_tanh_and_mul

    x = _inputs(rows, d, dtype, device="cpu")
    out = gelu_tanh_and_mul(x)
    _check(out, x)
    if dtype == torch.bfloat16:  # away from the cancelling tail, where torch's form gives 0
        ref = reference.gelu_tanh_and_mul(x)
        steps = (out.view(torch.int16).int() - ref.view(torch.int16).int()).abs()
        assert steps[ref.abs() > 1e-3].max() <= 1


def test_cpu_falls_back_on_other_layouts() -> None:
    from pagedserve.kernels.cpu import gelu_tanh_and_mul

    three_d = torch.randn(2, 3, 16)
    assert torch.equal(gelu_tanh_and_mul(three_d), reference.gelu_tanh_and_mul(three_d))


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows, d", [(3, 64), (2, 1000)])
def test_triton(tk, rows, d, dtype) -> None:
    x = _inputs(rows, d, dtype)
    _check(tk.gelu_tanh_and_mul(x), x)
