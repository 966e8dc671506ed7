"""Writing one step's keys and values into their cache slots; kernels.reference.kv_write is the
specification. One program per token copies all its KV heads; slot -1 (padding) is skipped.
Cache offsets are int64, so pools beyond 2^31 elements work."""

from __future__ import annotations

import torch

import triton
import triton.language as tl
from pagedserve.kernels.triton.runtime import check_device, next_pow2


@triton.jit
def f32_to_e4m3(x):
    """fp32 -> e4m3 bits (uint8), saturated to +-448, rounded to nearest even (ties to even as
    torch's cast): normal codes by rounding the fp32 bits to 3 mantissa bits and rebiasing the
    exponent (127 -> 7), subnormal ones (< 2^-6) by rounding x * 2^9 to an integer (adding and
    taking away 2^23 rounds to even). NaN stays NaN (0x7f)."""
    sign = (x.to(tl.uint32, bitcast=True) >> 24) & 0x80
    a = tl.minimum(tl.abs(x), 448.0)
    au = a.to(tl.uint32, bitcast=True)
    normal = ((au + 0x7FFFF + ((au >> 20) & 1)) >> 20) - 960
    sub = ((a * 512.0 + 8388608.0) - 8388608.0).to(tl.uint32)
    code = tl.where(a < 0.015625, sub, normal)
    code = tl.where(x != x, 0x7F, code) | sign
    return code.to(tl.uint8)


@triton.jit
def _copy_token(src_ptr, dst_ptr, t, block, row, stride_t, stride_h, stride_cb, stride_ct,
                stride_ch, scale, NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                HEADS_P: tl.constexpr, HEAD_DIM_P: tl.constexpr, KV_FP8: tl.constexpr):
    h = tl.arange(0, HEADS_P)[:, None]
    d = tl.arange(0, HEAD_DIM_P)[None, :]
    mask = (h < NUM_HEADS) & (d < HEAD_DIM)
    x = tl.load(src_ptr + t * stride_t + h * stride_h + d, mask=mask)
    dst = dst_ptr + block * stride_cb + row * stride_ct + h * stride_ch + d
    if KV_FP8:
        tl.store(dst, f32_to_e4m3(x.to(tl.float32) / scale), mask=mask)
    else:
        tl.store(dst, x.to(dst_ptr.dtype.element_ty), mask=mask)


# The slot mapping may be a slice of a packed per-step buffer: its alignment must not pick a variant.
@triton.jit(do_not_specialize_on_alignment=["slot_mapping_ptr"])
def _write_kv_kernel(
    key_ptr, value_ptr,  # [num_tokens, num_kv_heads, head_dim]
    k_cache_ptr, v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping_ptr,  # [num_tokens] int64
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kct, stride_kch, stride_vcb, stride_vct, stride_vch,
    k_scale, v_scale,  # fp8: what stored values are divided by
    BLOCK_SIZE: tl.constexpr, NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEADS_P: tl.constexpr, HEAD_DIM_P: tl.constexpr, KV_FP8: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + t).to(tl.int64)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    row = slot % BLOCK_SIZE
    _copy_token(key_ptr, k_cache_ptr, t, block, row, stride_kt, stride_kh, stride_kcb,
                stride_kct, stride_kch, k_scale, NUM_HEADS, HEAD_DIM, HEADS_P, HEAD_DIM_P, KV_FP8)
    _copy_token(value_ptr, v_cache_ptr, t, block, row, stride_vt, stride_vh, stride_vcb,
                stride_vct, stride_vch, v_scale, NUM_HEADS, HEAD_DIM, HEADS_P, HEAD_DIM_P, KV_FP8)


def write_kv(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64: block_id * block_size + offset, or -1 to skip
    *,
    k_scale: float = 1.0,  # fp8 caches store key / k_scale
    v_scale: float = 1.0,
) -> None:
    """Store token t's K/V at slot slot_mapping[t], in the cache's dtype; a slot of -1 (padding)
    is skipped."""
    num_tokens, num_heads, head_dim = key.shape
    block_size = k_cache.shape[1]
    assert value.shape == key.shape and v_cache.shape == k_cache.shape
    assert k_cache.shape[2:] == (num_heads, head_dim)
    assert key.stride(2) == 1 and value.stride(2) == 1
    assert k_cache.stride(3) == 1 and v_cache.stride(3) == 1
    check_device(key, value, k_cache, v_cache, slot_mapping)
    if num_tokens == 0:
        return
    kv_fp8 = k_cache.dtype == torch.float8_e4m3fn
    if kv_fp8:  # written as bytes (the interpreter has no fp8 type)
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    _write_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), float(k_scale), float(v_scale),
        BLOCK_SIZE=block_size, NUM_HEADS=num_heads, HEAD_DIM=head_dim,
        HEADS_P=next_pow2(num_heads), HEAD_DIM_P=next_pow2(head_dim), KV_FP8=kv_fp8,
        num_warps=4 if num_heads * head_dim >= 1024 else 1,
    )
