"""Writing one step's keys and values into their cache slots, converting to the cache's dtype."""

from __future__ import annotations

import torch

FP8_MAX = 448.0  # e4m3's largest finite value: larger magnitudes saturate to it


def to_cache_dtype(x: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """x as a cache of `dtype` stores it. fp8 (float8_e4m3fn): x / scale in float32, saturated to
    +-448, rounded to nearest even; any other dtype: a cast (the scale is not used)."""
    if dtype == torch.float8_e4m3fn:
        return (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(dtype)
    return x.to(dtype)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """One-byte dtypes as uint8: torch's CPU index_copy_ has no float8 kernel."""
    return t.view(torch.uint8) if t.element_size() == 1 else t


def write_kv(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64: block_id * block_size + offset, or -1 to skip
    *,
    k_scale: float = 1.0,  # fp8 caches store key / k_scale (kernels read stored * k_scale)
    v_scale: float = 1.0,
) -> None:
    """Store token t's K/V at slot slot_mapping[t]; a slot of -1 (padding) is skipped."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    for x, cache, scale in ((key, k_cache, k_scale), (value, v_cache, v_scale)):
        flat = _bytes(cache.view(-1, cache.shape[2], cache.shape[3]))
        flat.index_copy_(0, slots, _bytes(to_cache_dtype(x[keep], cache.dtype, scale)))
