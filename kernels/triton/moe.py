"""Mixture-of-experts MLP as a grouped GEMM in two launches; kernels.reference.moe is the
specification.

The T*K (token, slot) pairs are sorted by expert and each expert's run padded to a whole block of
BLOCK_M rows, so every block of sorted rows belongs to one expert:

    sorted rows  | e0 e0 e0 -- | e1 -- -- -- | e3 e3 e3 e3 | e3 -- -- -- |  (-- = padding, p = T*K)
    block_expert |     0       |      1      |      3      |      3      |  -1 ... (spare blocks)

    launch 1, one program per (block, tile of I):  act[p] = silu(x[t] @ gate_e.T) * (x[t] @ up_e.T)
    launch 2, one program per (block, tile of H):  pairs[p] = w[p] * (act[p] @ w2_e.T)   (float32)

and the K slots of each token are summed in float32 after (a deterministic sum, no atomics). The
grouping runs on the device with no host read: the grid is sized for the most blocks T*K pairs
can need, and blocks past the last expert's run (block_expert -1) return at once.
"""

from __future__ import annotations

import torch

import triton
import triton.language as tl
from pagedserve.kernels.triton.runtime import check_device, dot_in_fp32, next_pow2

BLOCK_M = 16  # tl.dot's smallest tile; a decode step's few rows per expert waste little


@triton.jit
def _dot(a, b, DOT_FP32: tl.constexpr):
    if DOT_FP32:  # fp32 operands (no tf32), or the interpreter, whose bf16 tl.dot is wrong
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b)
    return c


@triton.jit
def _row_block(sorted_ids_ptr, block_expert_ptr, num_pairs, BLOCK_M: tl.constexpr):
    """(expert of this program's block or -1, its pair ids [BLOCK_M], which are real pairs)."""
    block = tl.program_id(0)
    expert = tl.load(block_expert_ptr + block)
    pairs = tl.load(sorted_ids_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M))
    return expert, pairs, pairs < num_pairs


@triton.jit(do_not_specialize=["num_pairs"])
def _gate_up_kernel(
    x_ptr,  # [T, H]
    w13_ptr,  # [E, 2I, H]: rows [0, I) gate, [I, 2I) up
    act_ptr,  # [T*K, I] out, x's dtype
    sorted_ids_ptr, block_expert_ptr, num_pairs,
    stride_x, stride_we, stride_wn, stride_act,
    TOP_K: tl.constexpr, HIDDEN: tl.constexpr, INTER: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr,
):
    expert, pairs, real = _row_block(sorted_ids_ptr, block_expert_ptr, num_pairs, BLOCK_M)
    if expert < 0:
        return
    tokens = (pairs // TOP_K).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < INTER
    w = w13_ptr + expert.to(tl.int64) * stride_we
    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, HIDDEN, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + tokens[:, None] * stride_x + ks[None, :],
                    mask=real[:, None] & (ks[None, :] < HIDDEN), other=0.0)
        b_mask = (ks[:, None] < HIDDEN) & col_ok[None, :]
        b_gate = tl.load(w + cols[None, :].to(tl.int64) * stride_wn + ks[:, None],
                         mask=b_mask, other=0.0)
        b_up = tl.load(w + (cols[None, :] + INTER).to(tl.int64) * stride_wn + ks[:, None],
                       mask=b_mask, other=0.0)
        gate += _dot(a, b_gate, DOT_FP32)
        up += _dot(a, b_up, DOT_FP32)
    dtype = act_ptr.dtype.element_ty
    g = gate.to(dtype).to(tl.float32)  # each GEMM rounds to the dtype, as the reference's does
    silu = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
    out = (silu * up.to(dtype).to(tl.float32)).to(dtype)
    tl.store(act_ptr + pairs[:, None].to(tl.int64) * stride_act + cols[None, :], out,
             mask=real[:, None] & col_ok[None, :])


@triton.jit(do_not_specialize=["num_pairs"])
def _down_kernel(
    act_ptr,  # [T*K, I]
    w2_ptr,  # [E, H, I]
    weights_ptr,  # [T*K] routing weights
    out_ptr,  # [T*K, H] float32 out: each pair's weighted expert output
    sorted_ids_ptr, block_expert_ptr, num_pairs,
    stride_act, stride_we, stride_wn, stride_out,
    HIDDEN: tl.constexpr, INTER: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr,
):
    expert, pairs, real = _row_block(sorted_ids_ptr, block_expert_ptr, num_pairs, BLOCK_M)
    if expert < 0:
        return
    rows = pairs.to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < HIDDEN
    w = w2_ptr + expert.to(tl.int64) * stride_we
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, INTER, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(act_ptr + rows[:, None] * stride_act + ks[None, :],
                    mask=real[:, None] & (ks[None, :] < INTER), other=0.0)
        b = tl.load(w + cols[None, :].to(tl.int64) * stride_wn + ks[:, None],
                    mask=(ks[:, None] < INTER) & col_ok[None, :], other=0.0)
        acc += _dot(a, b, DOT_FP32)
    down = acc.to(act_ptr.dtype.element_ty).to(tl.float32)
    weight = tl.load(weights_ptr + rows, mask=real, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], down * weight[:, None],
             mask=real[:, None] & col_ok[None, :])


def align_by_expert(topk_ids: torch.Tensor, num_experts: int,
                    block_m: int = BLOCK_M) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted_ids [blocks * block_m]: pair ids grouped by expert, each run padded with T*K;
    block_expert [blocks]: each block's expert, -1 past the last run). Device ops only: the
    block count is the most the pairs can need, cdiv(T*K, block_m) + min(E, T*K)."""
    flat = topk_ids.reshape(-1).long()
    num_pairs, device = flat.numel(), flat.device
    counts = torch.zeros(num_experts, dtype=torch.long, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # bincount would read its max on the host
    padded = (counts + block_m - 1) // block_m * block_m
    run_end = torch.cumsum(padded, 0)
    order = torch.argsort(flat, stable=True)
    expert = flat[order]
    rank = torch.arange(num_pairs, device=device) - (torch.cumsum(counts, 0) - counts)[expert]
    blocks = triton.cdiv(num_pairs, block_m) + min(num_experts, num_pairs)
    sorted_ids = torch.full((blocks * block_m,), num_pairs, dtype=torch.int32, device=device)
    sorted_ids[run_end[expert] - padded[expert] + rank] = order.to(torch.int32)
    starts = torch.arange(blocks, device=device) * block_m
    block_expert = torch.searchsorted(run_end, starts, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return sorted_ids, block_expert


def _tiles(n: int, k: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K) for an output width n and a reduction depth k."""
    return min(64, max(16, next_pow2(n))), min(64, max(16, next_pow2(k)))


def fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """x [T, H]; w13 [E, 2I, H]; w2 [E, H, I]; topk_weights, topk_ids [T, K] -> [T, H]."""
    check_device(x, w13, w2, topk_weights, topk_ids)
    tokens, top_k = topk_ids.shape
    num_experts, hidden, inter = w2.shape
    assert w13.shape == (num_experts, 2 * inter, hidden) and x.shape == (tokens, hidden)
    assert x.stride(1) == 1 and w13.stride(2) == 1 and w2.stride(2) == 1, "rows must be contiguous"
    num_pairs = tokens * top_k
    if num_pairs == 0:
        return torch.empty_like(x)
    sorted_ids, block_expert = align_by_expert(topk_ids, num_experts)
    act = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)
    pairs = torch.empty(num_pairs, hidden, dtype=torch.float32, device=x.device)
    fp32 = dot_in_fp32(x.dtype)
    bn, bk = _tiles(inter, hidden)
    _gate_up_kernel[(len(block_expert), triton.cdiv(inter, bn))](
        x, w13, act, sorted_ids, block_expert, num_pairs,
        x.stride(0), w13.stride(0), w13.stride(1), act.stride(0),
        TOP_K=top_k, HIDDEN=hidden, INTER=inter, BLOCK_M=BLOCK_M, BLOCK_N=bn, BLOCK_K=bk,
        DOT_FP32=fp32,
    )
    bn, bk = _tiles(hidden, inter)
    weights = topk_weights.reshape(-1).contiguous()
    _down_kernel[(len(block_expert), triton.cdiv(hidden, bn))](
        act, w2, weights, pairs, sorted_ids, block_expert, num_pairs,
        act.stride(0), w2.stride(0), w2.stride(1), pairs.stride(0),
        HIDDEN=hidden, INTER=inter, BLOCK_M=BLOCK_M, BLOCK_N=bn, BLOCK_K=bk, DOT_FP32=fp32,
    )
    return pairs.view(tokens, top_k, hidden).sum(1).to(x.dtype)
