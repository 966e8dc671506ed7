"""Paged attention over a varlen batch: the specification and the CPU path.

One step's queries are flat: sequence i owns query rows cu_seqlens_q[i]:cu_seqlens_q[i+1], which are
the LAST q_len_i positions of its context of seq_lens[i] tokens. The context's K/V live in the cache
pages that block_tables[i] lists, in logical order:

    context of seq i:  | pos 0 .. seq_len-q_len-1 (cached earlier) | seq_len-q_len .. seq_len-1 (this step) |
    page of pos p:     block_tables[i, p // block_size], row p % block_size

A query at position p attends to keys at positions k with k <= p (causal) and, with a sliding
window W > 0, k > p - W. Prompt chunks and single decode tokens mix freely in one batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _gather_context(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """K or V of one sequence's context, [seq_len, num_kv_heads, head_dim]."""
    block_size = cache.shape[1]
    num_blocks = (seq_len + block_size - 1) // block_size
    pages = cache[block_table[:num_blocks].long()]
    return pages.reshape(-1, cache.shape[2], cache.shape[3])[:seq_len]


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
    scale: float, sliding_window: int, softcap: float,
) -> torch.Tensor:
    """q [Q, Hq, D], k/v [K, Hkv, D], q_pos [Q] -> [Q, Hq, D], computed in float32."""
    group = q.shape[1] // k.shape[1]
    qf = q.float().transpose(0, 1)  # [Hq, Q, D]
    kf = k.float().repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, K, D]
    vf = v.float().repeat_interleave(group, dim=1).transpose(0, 1)
    scores = torch.matmul(qf, kf.transpose(1, 2)) * scale  # [Hq, Q, K]
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    k_pos = torch.arange(k.shape[0], device=q.device)
    allowed = k_pos[None, :] <= q_pos[:, None]
    if sliding_window > 0:
        allowed &= k_pos[None, :] > q_pos[:, None] - sliding_window
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, vf).transpose(0, 1)  # [Q, Hq, D]


def _decode_batch(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
    block_tables: torch.Tensor, scale: float, sliding_window: int, softcap: float,
) -> torch.Tensor:
    """One query per sequence: q [S, Hq, D] -> [S, Hq, D], contexts padded to the longest.

    Computed in float32 through torch's fused attention (on the CPU its float32 path is several
    times faster than bf16 for one query row); softcap needs the explicit formula.
    """
    num_seqs, num_q_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    max_len = int(seq_lens.max())
    pages = block_tables[:, : (max_len + block_size - 1) // block_size].long()
    k = k_cache[pages].reshape(num_seqs, -1, num_kv_heads, head_dim)[:, :max_len]
    v = v_cache[pages].reshape(num_seqs, -1, num_kv_heads, head_dim)[:, :max_len]
    k_pos = torch.arange(max_len, device=q.device)
    q_pos = (seq_lens.long() - 1)[:, None]
    allowed = k_pos[None, :] <= q_pos
    if sliding_window > 0:
        allowed &= k_pos[None, :] > q_pos - sliding_window
    # Slots past a shorter context (its last page's tail, table padding) may hold anything, NaN
    # included, and a masked NaN score or 0 * NaN is still NaN: zero them.
    invalid = (k_pos[None, :] > q_pos)[:, :, None, None]
    k = k.float().masked_fill_(invalid, 0).transpose(1, 2)  # [S, Hkv, T, D]
    v = v.float().masked_fill_(invalid, 0).transpose(1, 2)
    qf = q.float()[:, :, None, :]  # [S, Hq, 1, D]
    if softcap > 0:
        group = num_q_heads // num_kv_heads
        scores = torch.matmul(qf, k.repeat_interleave(group, 1).transpose(2, 3)) * scale
        scores = (softcap * torch.tanh(scores / softcap)).masked_fill(
            ~allowed[:, None, None, :], float("-inf"))
        out = torch.matmul(torch.softmax(scores, -1), v.repeat_interleave(group, 1))
    else:
        out = F.scaled_dot_product_attention(
            qf, k, v, attn_mask=allowed[:, None, None, :], scale=scale, enable_gqa=True)
    return out.reshape(num_seqs, num_q_heads, head_dim)


def paged_attention(
    q: torch.Tensor,  # [num_tokens, num_q_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    cu_seqlens_q: torch.Tensor,  # [num_seqs + 1] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32, context length including this step's queries
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    out: torch.Tensor,  # [num_tokens, num_q_heads, head_dim], written in full
    *,
    scale: float,
    max_seqlen_q: int,
    max_seqlen_k: int,
    sliding_window: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Write attention outputs for every query row into `out` and return it.

    max_seqlen_q / max_seqlen_k are host-side bounds (so kernels launch without a device sync);
    the reference does not need them.
    """
    cu = cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    single = [i for i in range(len(lens)) if cu[i + 1] - cu[i] == 1]
    if len(single) > 1:  # decode tokens: one batched gather and matmul instead of a loop
        rows = torch.tensor([cu[i] for i in single], device=q.device)
        idx = torch.tensor(single, device=q.device)
        out[rows] = _decode_batch(
            q[rows], k_cache, v_cache, seq_lens[idx], block_tables[idx],
            scale, sliding_window, softcap,
        ).to(out.dtype)
    for i, seq_len in enumerate(lens):
        start, end = cu[i], cu[i + 1]
        if end == start or (len(single) > 1 and end - start == 1):
            continue
        k = _gather_context(k_cache, block_tables[i], seq_len)
        v = _gather_context(v_cache, block_tables[i], seq_len)
        q_pos = torch.arange(seq_len - (end - start), seq_len, device=q.device)
        out[start:end] = _attend(q[start:end], k, v, q_pos, scale, sliding_window, softcap).to(out.dtype)
    return out
