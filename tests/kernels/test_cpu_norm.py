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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [128, 64, 36])  # 36: the scalar loop everywhere
def test_three_dimensional_input_is_normed_per_head(dtype, head_dim) -> None:
    """Qwen3's q/k norm: [tokens, heads, head_dim] views into fused qkv rows (tokens further
    apart than their heads), normed over the last dimension in C: within the last places of the
    reference, equal to the 2-D kernel on the same heads, and within bf16 of float64's formula."""
    qkv = (torch.randn(7, (4 + 2 * 2) * head_dim) * 3).to(dtype)
    q = qkv[:, : 4 * head_dim].view(7, 4, head_dim)
    k = qkv[:, 4 * head_dim: 6 * head_dim].view(7, 2, head_dim)
    w = torch.randn(head_dim).to(dtype)
    for x in (q, k):
        got = rms_norm(x, w, 1e-6)
        assert got.shape == x.shape and got.dtype == dtype and got.is_contiguous()
        assert torch.equal(got, rms_norm(x.reshape(-1, head_dim), w, 1e-6).view(x.shape))
        assert _ulps_apart(got, reference.rms_norm(x, w, 1e-6)) <= ULPS[dtype]
        xd = x.double()
        want = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
        assert torch.allclose(got.double(), want, rtol=2**-7, atol=2**-7)
    assert torch.equal(qkv[:, : 4 * head_dim].view(7, 4, head_dim), q)  # the input is untouched
