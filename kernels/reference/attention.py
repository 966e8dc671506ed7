"""Paged attention over a varlen batch: the specification and the CPU path.

One step's queries are flat: sequence i owns query rows cu_seqlens_q[i]:cu_seqlens_q[i+1], which are
the LAST q_len_i positions of its context of seq_lens[i] tokens. The context's K/V live in the cache
pages that block_tables[i] lists, in logical order:

    context of seq i:  | pos 0 .. seq_len-q_len-1 (cached earlier) | seq_len-q_len .. seq_len-1 (this step) |
    page of pos p:     block_tables[i, p // block_size], row p % block_size

A query at position p attends to keys at positions k with k <= p (causal) and, with a sliding
window W > 0, k > p - W. Prompt chunks and single decode tokens mix freely in one batch. Slots
outside every context may hold anything (NaN included) and must not affect the result.

Precision: scores, softmax and accumulation are float32. A bf16 cache under bf16 queries is
attended in bf16 by torch's fused attention, which (like the Triton kernel) rounds the
probabilities P to bf16 before P.V; any other pairing (a bf16 cache under float32 queries, an
fp8 cache) is upcast to float32 first. An fp8 cache's values are multiplied by k_scale / v_scale
as they are upcast. The output is cast to `out`'s dtype.

How the CPU gets speed from plain torch ops (the semantics above do not depend on it):
  - decode rows (one query) are grouped by context length, longest first, each group padded only
    to its own longest context and small enough that its gathered K/V stay in the CPU caches;
    padding to the batch's longest context wasted several times the work on long-tailed lengths;
  - K/V are gathered slot by slot, and a position past a context reads the sequence's own
    position 0 (a slot it wrote) then is masked out, so garbage never enters the arithmetic and
    no masking pass over the gathered tensors is needed;
  - a decode row's query heads that share a KV head are that head's query rows (GQA folded into
    the query length): torch's fused CPU attention is several times slower with enable_gqa for
    one-row queries, and bf16 then needs no upcast (half the bytes);
  - prompt chunks go one sequence at a time through torch's fused attention with an explicit mask;
  - the groups, slots and masks depend only on the batch, so they are made once per step and
    reused by every layer (recognised by content, see _step_plan).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Gathered K of one decode group, at most (bytes); V takes as much again. Groups this size stay in
# the CPU caches between the gather and the attention; much larger ones ran at half the speed.
DECODE_GROUP_BYTES = 4 << 20


def _compute_dtype(cache: torch.dtype, q: torch.dtype) -> torch.dtype:
    """bf16 queries on a bf16 cache stay bf16 (fused attention accumulates in float32);
    anything else: float32 (a float32 model keeps its queries exact over a narrower cache)."""
    return torch.bfloat16 if cache == q == torch.bfloat16 else torch.float32


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


def _gather(cache: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype,
            scale: float = 1.0) -> torch.Tensor:
    """[S, L] slots -> [S, Hkv, L, D] in dtype, times scale when it is not 1 (the cache is
    contiguous: a view, never a copy)."""
    num_kv_heads, head_dim = cache.shape[2], cache.shape[3]
    flat = cache.view(-1, num_kv_heads, head_dim)
    if cache.element_size() == 1:  # fp8: torch's CPU index_select has no float8 kernel
        rows = flat.view(torch.uint8).index_select(0, slots.flatten()).view(cache.dtype)
    else:
        rows = flat.index_select(0, slots.flatten())
    rows = rows.to(dtype)
    if scale != 1.0:
        rows = rows.mul_(scale)
    return rows.view(*slots.shape, num_kv_heads, head_dim).transpose(1, 2)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
               scale: float, softcap: float) -> torch.Tensor:
    """q [B, Hq, Q, D], k/v [B, Hkv, K, D], allowed [B, 1, Q, K] -> [B, Hq, Q, D].

    Query head h reads KV head h // (Hq / Hkv). Every query row has at least one allowed key
    (itself). Softcap needs the written-out formula, in float32.
    """
    if softcap <= 0:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale,
                                              enable_gqa=q.shape[1] != k.shape[1])
    # The query heads of one KV head are its rows (no repeated K/V); in place after the matmul.
    b, hq, rows, d = q.shape
    hkv = k.shape[1]
    qf = q.float().reshape(b, hkv, hq // hkv * rows, d)
    scores = torch.matmul(qf, k.float().transpose(2, 3)).mul_(scale).div_(softcap)
    scores = scores.tanh_().mul_(softcap).view(b, hkv, hq // hkv, rows, -1)
    scores.masked_fill_(~allowed[:, :, None], float("-inf"))
    probs = torch.softmax(scores, -1).view(b, hkv, hq // hkv * rows, -1)
    return torch.matmul(probs, v.float()).view(b, hq, rows, d)


@dataclass(frozen=True)
class _Span:
    """Query rows attended together, in torch SDPA's shapes: one group of decode sequences
    (rows [G] of the flat batch) or one sequence's prompt chunk (rows a slice of Q)."""

    rows: torch.Tensor | slice
    slots: torch.Tensor  # [G, L] (decode) or [1, L]: cache slot of each context position
    allowed: torch.Tensor  # [G, 1, 1, L] or [1, 1, Q, L]: inside the context, causal
    q_pos: torch.Tensor  # [G, 1, 1, 1] or [1, 1, Q, 1]: each query's position (sliding window)

    @property
    def is_decode(self) -> bool:
        return not isinstance(self.rows, slice)


def _decode_span(rows: list[int], seqs: list[int], seq_lens: torch.Tensor,
                 block_tables: torch.Tensor, block_size: int) -> _Span:
    idx = torch.tensor(seqs, device=seq_lens.device)
    slots, inside = _context_slots(seq_lens[idx], block_tables[idx], block_size)
    q_pos = (seq_lens[idx].long() - 1)[:, None, None, None]
    return _Span(torch.tensor(rows, device=seq_lens.device), slots, inside[:, None, None, :],
                 q_pos)


def _prompt_span(start: int, end: int, seq_len: int, block_table: torch.Tensor,
                 block_size: int) -> _Span:
    lens = torch.tensor([seq_len], device=block_table.device)
    slots, _ = _context_slots(lens, block_table[None, :], block_size)
    k_pos = torch.arange(seq_len, device=block_table.device)
    q_pos = torch.arange(seq_len - (end - start), seq_len, device=block_table.device)[:, None]
    return _Span(slice(start, end), slots, (k_pos[None, :] <= q_pos)[None, None],
                 q_pos[None, None])


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


def _plan(cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
          block_size: int, group_tokens: int) -> list[_Span]:
    """The spans of one batch: decode groups, then each sequence with more than one query."""
    cu, lens = cu_seqlens_q.tolist(), seq_lens.tolist()
    decode = [i for i in range(len(lens)) if cu[i + 1] - cu[i] == 1]
    spans = [_decode_span([cu[i] for i in group], group, seq_lens, block_tables, block_size)
             for group in _decode_groups(decode, lens, group_tokens)]
    spans += [_prompt_span(cu[i], cu[i + 1], lens[i], block_tables[i], block_size)
              for i in range(len(lens)) if cu[i + 1] - cu[i] > 1]
    return spans


_last_plan: tuple[tuple, tuple[torch.Tensor, ...], list[_Span]] | None = None


def _step_plan(cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
               block_size: int, group_tokens: int) -> list[_Span]:
    """_plan, reused while the batch is unchanged (every layer of one step): the inputs are
    compared by content with a copy taken when the plan was made."""
    global _last_plan
    key = (block_size, group_tokens)
    inputs = (cu_seqlens_q, seq_lens, block_tables)
    if _last_plan is not None and _last_plan[0] == key and all(
            a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
            and torch.equal(a, b) for a, b in zip(_last_plan[1], inputs)):
        return _last_plan[2]
    spans = _plan(*inputs, block_size, group_tokens)
    _last_plan = (key, tuple(t.clone() for t in inputs), spans)
    return spans


def _attend_span(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, span: _Span,
                 scale: float, sliding_window: int, softcap: float,
                 kv_scales: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
    """q [rows, Hq, D] -> [rows, Hq, D]. A decode group's query heads sharing KV head j are j's
    query rows (q viewed [G, Hkv, Hq / Hkv, D]); a prompt chunk is [1, Hq, Q, D]."""
    allowed = span.allowed
    if sliding_window > 0:
        k_pos = torch.arange(span.slots.shape[1], device=q.device)
        allowed = allowed & (k_pos > span.q_pos - sliding_window)
    dtype = _compute_dtype(k_cache.dtype, q.dtype)
    if span.is_decode:
        qs = q.to(dtype).view(q.shape[0], k_cache.shape[2], -1, q.shape[2])
    else:
        qs = q.to(dtype).transpose(0, 1)[None]
    k = _gather(k_cache, span.slots, dtype, kv_scales[0])
    out = _attention(qs, k, _gather(v_cache, span.slots, dtype, kv_scales[1]), allowed, scale,
                     softcap)
    return out.reshape(q.shape) if span.is_decode else out[0].transpose(0, 1)


def attend_spans(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                 out: torch.Tensor, *, scale: float, sliding_window: int, softcap: float,
                 k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """paged_attention's work (also the CPU backend's fallback where C cannot run)."""
    token_bytes = (k_cache.shape[2] * k_cache.shape[3]
                   * _compute_dtype(k_cache.dtype, q.dtype).itemsize)
    group_tokens = max(1, DECODE_GROUP_BYTES // token_bytes)
    spans = _step_plan(cu_seqlens_q, seq_lens, block_tables, k_cache.shape[1], group_tokens)
    for span in spans:
        out[span.rows] = _attend_span(q[span.rows], k_cache, v_cache, span, scale,
                                      sliding_window, softcap, (k_scale, v_scale)).to(out.dtype)


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
    k_scale: float = 1.0,  # an fp8 cache's keys are stored / k_scale: read back times it
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Write attention outputs for every query row into `out` and return it.

    max_seqlen_q / max_seqlen_k are host-side bounds (so kernels launch without a device sync);
    the reference does not need them.
    """
    attend_spans(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, out, scale=scale,
                 sliding_window=sliding_window, softcap=softcap, k_scale=k_scale, v_scale=v_scale)
    return out
