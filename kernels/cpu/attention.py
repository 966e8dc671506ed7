"""Paged attention on the CPU: decode rows in C (paged_decode.c), prompt chunks through the
reference's fused attention. Same signature and semantics as kernels.reference.paged_attention.

A decode row reads its whole context for three multiply-adds per element, so it is bound by memory:
the reference gathers each context into a copy and runs torch's fused attention on queries of a
few rows, where that kernel's fixed costs dominate. The C kernel reads K and V once from the pages.
Prompt chunks have many query rows per key and stay with the reference (matrix multiplies).

A sequence with a few query rows (speculative decoding's verification: the last token and its
drafts) is a few decode rows: row j of n, in a context of L tokens, is a decode row whose context
is its first L - (n - 1 - j) tokens (causality), over the same pages. Those go to C row by row, not
through the reference's per-sequence span, whose fixed costs per layer would multiply by the batch.
"""

from __future__ import annotations

import ctypes

import torch

from pagedserve.kernels.cpu.build import load, omp_threads
from pagedserve.kernels.cpu.kv_write import KINDS
from pagedserve.kernels.reference.attention import attend_spans

# (q and out, cache) dtype pairs the C kernel reads: the same dtype, or a narrower cache
_PAIRS = {(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
          (torch.float32, torch.bfloat16), (torch.float32, torch.float8_e4m3fn),
          (torch.bfloat16, torch.float8_e4m3fn)}


class _DecodeShape(ctypes.Structure):
    _fields_ = [("num_q_heads", ctypes.c_int), ("num_kv_heads", ctypes.c_int),
                ("head_dim", ctypes.c_int), ("block_size", ctypes.c_int),
                ("q_row_stride", ctypes.c_int64), ("out_row_stride", ctypes.c_int64),
                ("block_table_stride", ctypes.c_int64), ("scale", ctypes.c_float),
                ("softcap", ctypes.c_float), ("sliding_window", ctypes.c_int),
                ("q_kind", ctypes.c_int), ("cache_kind", ctypes.c_int),
                ("k_scale", ctypes.c_float), ("v_scale", ctypes.c_float)]


def available() -> tuple[bool, str]:
    """Whether the C kernels built here, and why not."""
    for name in ("paged_decode", "rotary", "norm", "activation", "kv_write"):
        lib, why = load(name)
        if lib is None:
            return False, why
    return True, ""


SHORT_QUERY_ROWS = 8  # sequences with at most this many query rows attend in C, row by row

DecodeRows = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
_last: tuple[tuple, DecodeRows] | None = None  # ((max_rows, *inputs), what they gave)


def _decode_rows(cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                 block_tables: torch.Tensor, max_rows: int = SHORT_QUERY_ROWS) -> DecodeRows:
    """What the C kernel runs: (order, q_rows, seq_lens, block_tables), one entry per decode row,
    order longest context first (the C side hands rows out in it, so short ones fill in at the
    end). With one-query sequences only, the step's own tensors; with short multi-query ones,
    each of their rows as a decode row of its own. Made once per step: every layer of a step
    passes equal tensors (compared by content). Sequences with more than max_rows query rows
    are left out (the reference attends those)."""
    global _last
    inputs = (cu_seqlens_q, seq_lens, block_tables)
    if _last is not None and _last[0][0] == max_rows and all(
            a.shape == b.shape and torch.equal(a, b) for a, b in zip(_last[0][1:], inputs)):
        return _last[1]
    cu, lens = cu_seqlens_q.tolist(), seq_lens.tolist()
    spans = [(i, cu[i + 1] - cu[i]) for i in range(len(lens))
             if 1 <= cu[i + 1] - cu[i] <= max_rows]
    if all(n == 1 for _, n in spans):
        rows = (cu_seqlens_q, seq_lens, block_tables)
        order = sorted((i for i, _ in spans), key=lambda i: -lens[i])
    else:  # one entry per row: its q row, its causal context, its sequence's pages
        seq_of = [i for i, n in spans for _ in range(n)]
        ctx = [lens[i] - (n - 1 - j) for i, n in spans for j in range(n)]
        q_rows = [cu[i] + j for i, n in spans for j in range(n)]
        rows = (torch.tensor(q_rows, dtype=torch.int32), torch.tensor(ctx, dtype=torch.int32),
                block_tables[torch.tensor(seq_of, dtype=torch.int64)].contiguous())
        order = sorted(range(len(ctx)), key=lambda r: -ctx[r])
    result = (torch.tensor(order, dtype=torch.int32), *rows)
    _last = ((max_rows, *(t.clone() for t in inputs)), result)
    return result


def _supported(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               out: torch.Tensor, *index: torch.Tensor) -> bool:
    d = q.shape[2]
    return (q.device.type == "cpu" and (q.dtype, k_cache.dtype) in _PAIRS
            and q.dtype == out.dtype and k_cache.dtype == v_cache.dtype
            and k_cache.is_contiguous() and v_cache.is_contiguous()
            and q.stride()[1:] == (d, 1) and out.stride()[1:] == (d, 1)
            and all(t.dtype == torch.int32 and t.is_contiguous() for t in index))


def _run_decode(q, k_cache, v_cache, out, cu_seqlens_q, seq_lens, block_tables, *, scale,
                sliding_window, softcap, k_scale, v_scale, max_rows=SHORT_QUERY_ROWS) -> None:
    lib, _ = load("paged_decode")
    seqs, q_rows, lens, tables = _decode_rows(cu_seqlens_q, seq_lens, block_tables, max_rows)
    if not len(seqs):
        return
    shape = _DecodeShape(q.shape[1], k_cache.shape[2], q.shape[2], k_cache.shape[1], q.stride(0),
                         out.stride(0), tables.stride(0), scale, softcap, sliding_window,
                         KINDS[q.dtype], KINDS[k_cache.dtype], k_scale, v_scale)
    ptrs = [ctypes.c_void_p(t.data_ptr()) for t in (q, k_cache, v_cache, out, seqs,
                                                    q_rows, lens, tables)]
    if lib.paged_decode(*ptrs, len(seqs), min(omp_threads(), len(seqs)), ctypes.byref(shape)):
        raise MemoryError("paged_decode: could not allocate its scratch buffer")


def paged_attention(
    q: torch.Tensor,  # [num_tokens, num_q_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], contiguous
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,  # [num_seqs + 1] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    out: torch.Tensor,  # [num_tokens, num_q_heads, head_dim], written in full
    *,
    scale: float,
    max_seqlen_q: int,
    max_seqlen_k: int,
    sliding_window: int = 0,
    softcap: float = 0.0,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    rowwise: bool = False,
) -> torch.Tensor:
    """kernels.reference.paged_attention, with decode rows computed by the C kernel when it is
    built and the tensors are in a layout it takes (otherwise the reference does everything).

    rowwise: every query row goes to the C kernel as a decode row of its causal context, so each
    row's result is the same however the rows are grouped into chunks and batches (prompt
    chunks are slower so: executor/batch_invariance.py). ValueError where C cannot take them."""
    index = (cu_seqlens_q, seq_lens, block_tables)
    kw = {"scale": scale, "sliding_window": sliding_window, "softcap": softcap,
          "k_scale": k_scale, "v_scale": v_scale}
    in_c = load("paged_decode")[0] is not None and _supported(q, k_cache, v_cache, out, *index)
    if rowwise:
        if not in_c:
            raise ValueError("rowwise: the C decode kernel is not built or cannot take these "
                             f"tensors (q {q.dtype}, cache {k_cache.dtype})")
        _run_decode(q, k_cache, v_cache, out, *index, max_rows=1 << 30, **kw)
        return out
    if in_c and max_seqlen_q > 1:
        attend_spans(q, k_cache, v_cache, *index, out, skip_query_rows=SHORT_QUERY_ROWS, **kw)
    elif not in_c:
        attend_spans(q, k_cache, v_cache, *index, out, **kw)
        return out
    _run_decode(q, k_cache, v_cache, out, *index, **kw)
    return out
