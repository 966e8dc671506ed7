"""The CPU backend's rotary embedding (kernels/cpu/rotary.c) against the reference: the same
bits, on the strided q/k views a fused QKV projection produces."""

from __future__ import annotations

import pytest
import torch

from pagedserve.kernels import reference
from pagedserve.kernels.cpu import rotary_embedding
from tests.kernels.common import require_cpu_kernel


@pytest.fixture(autouse=True)
def built() -> None:
    require_cpu_kernel("rotary")


def _qk(tokens: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype):
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim).to(dtype)
    q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    return qkv, q, k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "rotary_dim"), [
    (12, 4, 64, 64), (4, 4, 48, 48), (8, 2, 128, 64),  # the last: partial rotary
])
def test_bit_identical_to_reference(dtype, heads, kv_heads, head_dim, rotary_dim) -> None:
    qkv, q, k = _qk(37, heads, kv_heads, head_dim, dtype)
    expected = qkv.clone()
    q_ref, k_ref = (expected[:, : heads * head_dim].view_as(q),
                    expected[:, heads * head_dim:(heads + kv_heads) * head_dim].view_as(k))
    cache = torch.randn(500, rotary_dim)
    positions = torch.randint(0, 500, (37,))
    rotary_embedding(positions, q, k, cache)
    reference.rotary_embedding(positions, q_ref, k_ref, cache)
    assert torch.equal(qkv, expected)  # q, k and the untouched V columns
    assert not torch.equal(q, _qk(37, heads, kv_heads, head_dim, dtype)[1])


def _interleaved_rotation(x: torch.Tensor, cache: torch.Tensor,
                          positions: torch.Tensor) -> torch.Tensor:
    """gpt-j pairing written independently: element pairs (2i, 2i+1) are complex numbers turned
    by angle i of the position (the cache holds cos for each i, then sin)."""
    half = cache.shape[1] // 2
    cos, sin = cache[positions, :half], cache[positions, half:]
    turn = torch.complex(cos, sin).to(torch.complex128)[:, None, :]
    pairs = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(pairs * turn).flatten(-2)


def test_gptj_pairing_turns_interleaved_pairs() -> None:
    _, q, k = _qk(5, 4, 2, 32, torch.float32)
    angles = torch.rand(50, 16) * 6.28
    cache, positions = torch.cat([angles.cos(), angles.sin()], dim=1), torch.arange(5) * 7
    want_q, want_k = (_interleaved_rotation(t, cache, positions) for t in (q, k))
    rotary_embedding(positions, q, k, cache, is_neox=False)
    assert torch.allclose(q.double(), want_q, atol=1e-5) and torch.allclose(k.double(), want_k, atol=1e-5)
