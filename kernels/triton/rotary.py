"""Rotary position embedding applied in place to q and k; kernels.reference.rotary is the
specification (layouts, cache format). One program per token rotates all its q and k heads:

    neox:  pair (j, j + r/2)    gpt-j:  pair (2j, 2j + 1)      for j < r/2, r = rotary_dim
    x1' = x1 cos - x2 sin,  x2' = x2 cos + x1 sin   (fp32, then cast back)

Dimensions past rotary_dim are left untouched.
"""

from __future__ import annotations

import torch

import triton
import triton.language as tl
from pagedserve.kernels.triton.runtime import check_device, next_pow2


@triton.jit
def _rotate_heads(x_ptr, stride_h, cos, sin, NUM_HEADS: tl.constexpr, HEADS_P: tl.constexpr,
                  HALF: tl.constexpr, HALF_P: tl.constexpr, IS_NEOX: tl.constexpr):
    h = tl.arange(0, HEADS_P)[:, None]
    j = tl.arange(0, HALF_P)[None, :]
    mask = (h < NUM_HEADS) & (j < HALF)
    if IS_NEOX:
        p1 = x_ptr + h * stride_h + j
        p2 = p1 + HALF
    else:
        p1 = x_ptr + h * stride_h + 2 * j
        p2 = p1 + 1
    x1 = tl.load(p1, mask=mask, other=0.0)
    x2 = tl.load(p2, mask=mask, other=0.0)
    x1f = x1.to(tl.float32)
    x2f = x2.to(tl.float32)
    tl.store(p1, (x1f * cos - x2f * sin).to(x1.dtype), mask=mask)
    tl.store(p2, (x2f * cos + x1f * sin).to(x2.dtype), mask=mask)


# The positions may be a slice of a packed per-step buffer: its alignment must not pick a variant.
@triton.jit(do_not_specialize_on_alignment=["positions_ptr"])
def _rotary_kernel(
    positions_ptr,  # [num_tokens] int64
    q_ptr,  # [num_tokens, num_q_heads, head_dim]
    k_ptr,  # [num_tokens, num_kv_heads, head_dim]
    cos_sin_ptr,  # [max_position, 2 * HALF] fp32
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cs,
    NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr, Q_HEADS_P: tl.constexpr,
    K_HEADS_P: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr, IS_NEOX: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + t).to(tl.int64)
    j = tl.arange(0, HALF_P)
    cos = tl.load(cos_sin_ptr + pos * stride_cs + j, mask=j < HALF, other=0.0)[None, :]
    sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + j, mask=j < HALF, other=0.0)[None, :]
    _rotate_heads(q_ptr + t * stride_qt, stride_qh, cos, sin, NUM_Q_HEADS, Q_HEADS_P, HALF,
                  HALF_P, IS_NEOX)
    _rotate_heads(k_ptr + t * stride_kt, stride_kh, cos, sin, NUM_K_HEADS, K_HEADS_P, HALF,
                  HALF_P, IS_NEOX)


def rotary_embedding(
    positions: torch.Tensor,  # [num_tokens] int64
    q: torch.Tensor,  # [num_tokens, num_q_heads, head_dim], rotated in place
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim], rotated in place
    cos_sin_cache: torch.Tensor,  # [max_position, rotary_dim] float32
    is_neox: bool = True,
) -> None:
    num_tokens, num_q_heads, head_dim = q.shape
    num_k_heads = k.shape[1]
    rot = cos_sin_cache.shape[1]
    assert rot % 2 == 0 and rot <= head_dim and k.shape[0] == num_tokens
    assert q.stride(2) == 1 and k.stride(2) == 1 and cos_sin_cache.stride(1) == 1
    check_device(positions, q, k, cos_sin_cache)
    if num_tokens == 0:
        return
    half = rot // 2
    _rotary_kernel[(num_tokens,)](
        positions, q, k, cos_sin_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0),
        NUM_Q_HEADS=num_q_heads, NUM_K_HEADS=num_k_heads, Q_HEADS_P=next_pow2(num_q_heads),
        K_HEADS_P=next_pow2(num_k_heads), HALF=half, HALF_P=next_pow2(half), IS_NEOX=is_neox,
        num_warps=4 if num_q_heads * half >= 1024 else 1,
    )
