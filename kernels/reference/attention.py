"""Paged attention over a varlen batch: the specification and the CPU path.

One step's queries are flat: sequence i owns query rows cu_seqlens_q[i]:cu_seqlens_q[i+1], which are
the LAST q_len_i positions of its context of seq_lens[i] tokens. The context's K/V live in the cache
pages that block_tables[i] lists, in logical order:

    context of seq i:  | pos 0 .. seq_len-q_len-1 (cached earlier) | seq_len-q_len .. seq_len-1 (this step) |
    page of pos p:     block_tables[i, p // block_size], row p % block_size

A query at position p attends to keys at positions k with k <= p (causal) and, with a sliding
window W > 0, k > p - W. Prompt chunks and single decode tokens mix freely in one batch. Slots
outside every context may hold anything (NaN included) and must not affect the result.

Precision: scores, softmax and accumulation are float32. A bf16 cache is attended in bf16 by torch's
fused attention, which (like the Triton kernel) rounds the probabilities P to bf16 before P.V;
any other dtype is upcast to float32 first. The output is cast to `out`'s dtype.

How the CPU gets speed from plain torch ops (the semantics above do not depend on it):
  - decode rows (one query) are grouped by context length, longest first, each group padded only
    to its own longest context and small enough that its float32 K/V stay in the CPU caches;
    padding to the batch's longest context wasted several times the work on long-tailed lengths;
  - K/V are gathered slot by slot, and a position past a context reads the sequence's own
    position 0 (a slot it wrote) then is masked out, so garbage never enters the arithmetic and
    no masking pass over the gathered tensors is needed;
  - a decode row's query heads that share a KV head are that head's query rows (GQA folded into
    the query length): torch's fused CPU attention is several times slower with enable_gqa for
    one-row queries, and bf16 then needs no upcast (half the bytes);
  - prompt chunks go one sequence at a time through torch's fused attention with an explicit mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Gathered K of one decode group, at most (bytes); V takes as much again. Groups this size stay in
# the CPU caches between the gather and the attention; much larger ones ran at half the speed.
DECODE_GROUP_BYTES = 4 << 20


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """bf16 stays bf16 (fused attention accumulates in float32); anything else: float32."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def _context_slots(seq_lens: torch.Tensor, block_tables: torch.Tensor,
                   block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cache slot of every context position, [S, L] int64 (L = the longest context), and
    [S, L] bool: whether the position is inside the sequence's context. Positions past a context
    point at the sequence's position 0, so every slot read is one the sequence owns."""
    longest = int(seq_lens.max())
    pos = torch.arange(longest, device=seq_lens.device)
    inside = pos[None, :] < seq_lens.long()[:, None]
    pos = torch.where(inside, pos[None, :], 0)
    pages = block_tables[:, : (longest + block_size - 1) // block_size].long()
    return pages.gather(1, pos // block_size) * block_size + pos % block_size, inside


def _gather(cache: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[S, L] slots -> [S, Hkv, L, D] in dtype (the cache is contiguous: a view, never a copy)."""
    num_kv_heads, head_dim = cache.shape[2], cache.shape[3]
    rows = cache.view(-1, num_kv_heads, head_dim).index_select(0, slots.flatten())
    return rows.view(*slots.shape, num_kv_heads, head_dim).to(dtype).transpose(1, 2)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
               scale: float, softcap: float) -> torch.Tensor:
    """q [B, Hq, Q, D], k/v [B, Hkv, K, D], allowed [B, 1, Q, K] -> [B, Hq, Q, D].

    Query head h reads KV head h // (Hq / Hkv). Every query row has at least one allowed key
    (itself). Softcap needs the written-out formula, in float32.
    """
    if softcap <= 0:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale,
                                              enable_gqa=q.shape[1] != k.shape[1])
    group = q.shape[1] // k.shape[1]
    k, v = k.float().repeat_interleave(group, 1), v.float().repeat_interleave(group, 1)
    scores = torch.matmul(q.float(), k.transpose(2, 3)) * scale
    scores = (softcap * torch.tanh(scores / softcap)).masked_fill(~allowed, float("-inf"))
    return torch.matmul(torch.softmax(scores, -1), v)


def _decode_group(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float,
                  sliding_window: int, softcap: float) -> torch.Tensor:
    """One query per sequence, at position seq_len - 1: q [S, Hq, D] -> [S, Hq, D].

    The Hq / Hkv query heads of KV head j are its query rows: q is viewed as [S, Hkv, group, D].
    """
    slots, inside = _context_slots(seq_lens, block_tables, k_cache.shape[1])
    allowed = inside
    if sliding_window > 0:
        k_pos = torch.arange(slots.shape[1], device=q.device)
        allowed = inside & (k_pos[None, :] > seq_lens.long()[:, None] - 1 - sliding_window)
    dtype = _compute_dtype(k_cache.dtype)
    num_seqs, num_kv_heads = q.shape[0], k_cache.shape[2]
    out = _attention(q.to(dtype).view(num_seqs, num_kv_heads, -1, q.shape[2]),
                     _gather(k_cache, slots, dtype), _gather(v_cache, slots, dtype),
                     allowed[:, None, None, :], scale, softcap)
    return out.reshape(q.shape)


def _prompt_chunk(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_len: int,
                  block_table: torch.Tensor, scale: float, sliding_window: int,
                  softcap: float) -> torch.Tensor:
    """The last Q positions of one context: q [Q, Hq, D] -> [Q, Hq, D]."""
    lens = torch.tensor([seq_len], device=q.device)
    slots, _ = _context_slots(lens, block_table[None, :], k_cache.shape[1])
    k_pos = torch.arange(seq_len, device=q.device)
    q_pos = torch.arange(seq_len - q.shape[0], seq_len, device=q.device)
    allowed = k_pos[None, :] <= q_pos[:, None]
    if sliding_window > 0:
        allowed &= k_pos[None, :] > q_pos[:, None] - sliding_window
    dtype = _compute_dtype(k_cache.dtype)
    out = _attention(q.to(dtype).transpose(0, 1)[None], _gather(k_cache, slots, dtype),
                     _gather(v_cache, slots, dtype), allowed[None, None], scale, softcap)
    return out[0].transpose(0, 1)


def _decode_groups(seqs: list[int], lens: list[int], max_tokens: int) -> list[list[int]]:
    """Sequence indices in groups, longest context first; a group's longest context times its
    size stays within max_tokens (a single sequence may exceed it alone)."""
    order = sorted(seqs, key=lambda i: -lens[i])
    groups, start = [], 0
    while start < len(order):
        size = max(1, max_tokens // max(1, lens[order[start]]))
        groups.append(order[start:start + size])
        start += size
    return groups


def paged_attention(
    q: torch.Tensor,  # [num_tokens, num_q_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], contiguous
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], contiguous
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
    cu, lens = cu_seqlens_q.tolist(), seq_lens.tolist()
    decode = [i for i in range(len(lens)) if cu[i + 1] - cu[i] == 1]
    token_bytes = k_cache.shape[2] * k_cache.shape[3] * _compute_dtype(k_cache.dtype).itemsize
    for group in _decode_groups(decode, lens, DECODE_GROUP_BYTES // token_bytes):
        rows = torch.tensor([cu[i] for i in group], device=q.device)
        idx = torch.tensor(group, device=q.device)
        out[rows] = _decode_group(q[rows], k_cache, v_cache, seq_lens[idx], block_tables[idx],
                                  scale, sliding_window, softcap).to(out.dtype)
    for i, seq_len in enumerate(lens):
        start, end = cu[i], cu[i + 1]
        if end - start > 1:
            out[start:end] = _prompt_chunk(q[start:end], k_cache, v_cache, seq_len,
                                           block_tables[i], scale, sliding_window,
                                           softcap).to(out.dtype)
    return out
