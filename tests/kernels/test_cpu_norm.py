"""The CPU backend's RMSNorm and fused add + RMSNorm (kernels/cpu/norm.c) against the reference
and transformers' LlamaRMSNorm."""

from __future__ import annotations

import pytest
import torch

from pagedserve.kernels import reference
from pagedserve.kernels.cpu import fused_add_rms_norm, rms_norm
from tests.kernels.common import require_cpu_kernel


@pytest.fixture(autouse=True)
def built() -> None:
    require_cpu_kernel("norm")


# float32 sums the squares in another order (a few last places); bf16 rounds that away but for ties
ULPS = {torch.float32: 8, torch.bfloat16: 1}


def _ulps_apart(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units of the last place between same-dtype tensors."""
    bits = {torch.bfloat16: torch.int16, torch.float32: torch.int32}[a.dtype]
    return int((a.view(bits).long() - b.view(bits).long()).abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", [768, 96, 40, 36])  # 40: the scalar loop under AVX-512; 36: everywhere
def test_rms_norm_within_last_places_of_transformers(dtype, hidden) -> None:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(hidden, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(hidden))
        x = (torch.randn(33, hidden) * 3).to(dtype)
        expected = norm(x)
    got = rms_norm(x, norm.weight.data, 1e-5)
    assert _ulps_apart(got, expected) <= ULPS[dtype]
    if dtype == torch.bfloat16:  # rounded twice like transformers: a tie now and then, no more
        assert float((got != expected).float().mean()) < 1e-3
    wide = torch.randn(33, hidden + 16).to(dtype)  # rows further apart than hidden
    wide[:, :hidden] = x
    assert _ulps_apart(rms_norm(wide[:, :hidden], norm.weight.data, 1e-5), expected) <= ULPS[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_add_rms_norm_updates_the_residual_like_the_reference(dtype) -> None:
    x, w = torch.randn(17, 768).to(dtype), torch.randn(768).to(dtype)
    residual = torch.randn(17, 768).to(dtype)
    ref_residual = residual.clone()
    out, res = fused_add_rms_norm(x, residual, w, 1e-6)
    ref_out, _ = reference.fused_add_rms_norm(x, ref_residual, w, 1e-6)
    assert res is residual and torch.equal(residual, ref_residual)
    assert _ulps_apart(out, ref_out) <= ULPS[dtype]


def test_three_dimensional_input_is_normed_per_head() -> None:
    """Qwen3's q/k norm: [tokens, heads, head_dim], normed over the last dimension (a path the C
    kernel leaves to the reference), checked against the formula in float64."""
    x, w = torch.randn(5, 4, 32).bfloat16(), torch.randn(32).bfloat16()
    xd = x.double()
    want = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    got = rms_norm(x, w, 1e-6)
    assert got.shape == x.shape and got.dtype == torch.bfloat16
    assert torch.allclose(got.double(), want, rtol=2**-7, atol=2**-7)
