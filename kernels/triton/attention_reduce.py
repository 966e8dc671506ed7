"""Merging flash-decoding partials: the second kernel of the split-KV attention path.

Split s of a (token, head) holds acc_s = sum_k 2^(x_k - m_s) v_k, l_s = sum_k 2^(x_k - m_s) and its
running max m_s (log2 units). With M = max_s m_s and w_s = 2^(m_s - M):

    out = sum_s w_s acc_s / sum_s w_s l_s

A split that saw no allowed key has m_s = -inf, so w_s = 0; some split always holds the query's
own position, so M is finite.
"""

from __future__ import annotations

import torch

import triton
import triton.language as tl


@triton.jit
def _reduce_splits_kernel(
    part_acc_ptr,  # [num_tokens, num_q_heads, NUM_SPLITS, HEAD_DIM_P] fp32
    part_ml_ptr,  # [num_tokens, num_q_heads, NUM_SPLITS, 2] fp32
    out_ptr,  # [num_tokens, num_q_heads, head_dim]
    stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr, NUM_SPLITS: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    part = (tok * tl.num_programs(1) + head) * NUM_SPLITS + tl.arange(0, NUM_SPLITS)
    m = tl.load(part_ml_ptr + part * 2)
    l = tl.load(part_ml_ptr + part * 2 + 1)  # noqa: E741
    w = tl.exp2(m - tl.max(m, 0))
    dims = tl.arange(0, HEAD_DIM_P)
    acc = tl.load(part_acc_ptr + part[:, None] * HEAD_DIM_P + dims[None, :])
    o = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
    tl.store(out_ptr + tok * stride_ot + head * stride_oh + dims,
             o.to(out_ptr.dtype.element_ty), mask=dims < HEAD_DIM)


def reduce_splits(part_acc: torch.Tensor, part_ml: torch.Tensor, out: torch.Tensor) -> None:
    num_tokens, num_q_heads, num_splits, head_dim_p = part_acc.shape
    _reduce_splits_kernel[(num_tokens, num_q_heads)](
        part_acc, part_ml, out, out.stride(0), out.stride(1),
        HEAD_DIM=out.shape[2], HEAD_DIM_P=head_dim_p, NUM_SPLITS=num_splits,
    )
