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


def test_gptj_pairing_goes_to_the_reference() -> None:
    _, q, k = _qk(5, 4, 2, 32, torch.float32)
    q2, k2 = q.clone(), k.clone()
    cache, positions = torch.randn(50, 32), torch.arange(5)
    rotary_embedding(positions, q, k, cache, is_neox=False)
    reference.rotary_embedding(positions, q2, k2, cache, is_neox=False)
    assert torch.equal(q, q2) and torch.equal(k, k2)
