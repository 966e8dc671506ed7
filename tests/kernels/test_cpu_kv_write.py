"""The CPU backend's KV writes (kernels/cpu/kv_write.c) against the reference's index_copy_."""

from __future__ import annotations

import pytest
import torch

from pagedserve.kernels import reference
from pagedserve.kernels.cpu import write_kv
from tests.kernels.common import poisoned, require_cpu_kernel

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def built() -> None:
    require_cpu_kernel("kv_write")


def _qkv_views(tokens: int, heads: int, head_dim: int, dtype: torch.dtype):
    """key and value as views of one fused projection: rows further apart than their width."""
    qkv = torch.randn(tokens, 3 * heads * head_dim).to(dtype)
    key = qkv[:, heads * head_dim: 2 * heads * head_dim].view(tokens, heads, head_dim)
    return key, qkv[:, 2 * heads * head_dim:].view(tokens, heads, head_dim)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("heads", "head_dim", "block_size"), [(4, 64, 16), (3, 40, 8)])
def test_same_cache_as_the_reference(dtype, heads, head_dim, block_size) -> None:
    tokens, blocks = 37, 10
    key, value = _qkv_views(tokens, heads, head_dim, dtype)
    slots = torch.randperm(blocks * block_size)[:tokens]
    slots[::5] = -1  # padding
    shape = (blocks, block_size, heads, head_dim)
    k_ref, v_ref = poisoned(shape, dtype, CPU), poisoned(shape, dtype, CPU)
    k_out, v_out = k_ref.clone(), v_ref.clone()
    reference.write_kv(key, value, k_ref, v_ref, slots)
    write_kv(key, value, k_out, v_out, slots)
    torch.testing.assert_close(k_out, k_ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_out, v_ref, rtol=0, atol=0, equal_nan=True)


def test_a_slot_past_the_cache_raises_and_writes_nothing() -> None:
    key, value = _qkv_views(3, 2, 16, torch.float32)
    k_cache, v_cache = torch.zeros(4, 8, 2, 16), torch.zeros(4, 8, 2, 16)
    with pytest.raises(IndexError, match=r"slot_mapping\[2\] = 32"):
        write_kv(key, value, k_cache, v_cache, torch.tensor([0, 5, 32]))
    assert not k_cache.any() and not v_cache.any()


def test_a_cast_on_store_lands_in_its_slots() -> None:
    """A float32 key into a bf16 cache is cast on store; slot -1 is skipped. Checked slot by slot
    against plain indexing, not against the reference (which this case falls back to)."""
    key, value = _qkv_views(6, 2, 16, torch.float32)
    slots = [3, -1, 0, 17, 9, 30]
    k_out, v_out = torch.zeros(4, 8, 2, 16).bfloat16(), torch.zeros(4, 8, 2, 16).bfloat16()
    write_kv(key, value, k_out, v_out, torch.tensor(slots))
    k_want, v_want = torch.zeros_like(k_out), torch.zeros_like(v_out)
    for t, s in enumerate(slots):
        if s >= 0:
            k_want[s // 8, s % 8] = key[t].bfloat16()
            v_want[s // 8, s % 8] = value[t].bfloat16()
    assert torch.equal(k_out, k_want) and torch.equal(v_out, v_want)
