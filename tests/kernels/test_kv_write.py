"""Triton write_kv against the reference: every slot, padding skipped, casts, 64-bit offsets."""

from __future__ import annotations

import pytest
import torch

from pagedserve.kernels import reference
from tests.kernels.common import DEVICE, DTYPES, ON_GPU, poisoned

pytestmark = pytest.mark.triton


def _slots(num_tokens: int, num_slots: int, pad_every: int = 4) -> torch.Tensor:
    """Distinct random slots, with every pad_every-th token a -1 (padding)."""
    slots = torch.randperm(num_slots)[:num_tokens].to(torch.int64)
    slots[::pad_every] = -1
    return slots.to(DEVICE)


@pytest.mark.parametrize("cache_dtype", DTYPES)
@pytest.mark.parametrize(("num_heads", "head_dim", "block_size"), [(2, 32, 16), (3, 48, 8),
                                                                   (8, 128, 32)])
def test_write_kv_matches_reference(tk, cache_dtype, num_heads, head_dim, block_size) -> None:
    num_tokens, num_blocks = (40, 12) if not ON_GPU else (1000, 200)
    # key/value as views of one fused qkv projection (non-contiguous rows), in fp32: cast on store
    qkv = torch.randn(num_tokens, 3 * num_heads * head_dim, device=DEVICE)
    key = qkv[:, num_heads * head_dim:2 * num_heads * head_dim].view(num_tokens, num_heads, -1)
    value = qkv[:, 2 * num_heads * head_dim:].view(num_tokens, num_heads, head_dim)
    slots = _slots(num_tokens, num_blocks * block_size)
    shape = (num_blocks, block_size, num_heads, head_dim)
    k_ref, v_ref = poisoned(shape, cache_dtype), poisoned(shape, cache_dtype)
    k_out, v_out = k_ref.clone(), v_ref.clone()
    reference.write_kv(key, value, k_ref, v_ref, slots)
    tk.write_kv(key, value, k_out, v_out, slots)
    torch.testing.assert_close(k_out, k_ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_out, v_ref, rtol=0, atol=0, equal_nan=True)


def test_write_kv_slots_beyond_int32(tk) -> None:
    """Slots whose element offset exceeds 2^31, in a 4 GiB fp16 pool that is allocated but only
    touched where written (lazily mapped on the CPU); K and V pools are views of one tensor."""
    block_size, heads, head_dim = 16, 2, 64
    num_blocks = 2**31 // (block_size * heads * head_dim) + 8
    pool = torch.empty(num_blocks, 2, block_size, heads, head_dim, dtype=torch.float16,
                       device=DEVICE)
    k_cache, v_cache = pool[:, 0], pool[:, 1]
    slots = torch.tensor([(num_blocks - 1) * block_size + 3, -1, (num_blocks - 5) * block_size,
                          7, (num_blocks - 1) * block_size + 15], device=DEVICE)
    key = torch.randn(5, heads, head_dim, device=DEVICE).half()
    value = torch.randn(5, heads, head_dim, device=DEVICE).half()
    tk.write_kv(key, value, k_cache, v_cache, slots)
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            assert torch.equal(k_cache[slot // block_size, slot % block_size], key[t])
            assert torch.equal(v_cache[slot // block_size, slot % block_size], value[t])
