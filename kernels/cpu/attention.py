"""Paged attention on the CPU: every query row in C (paged_decode.c), as a decode row of its causal
context. Same signature and semantics as kernels.reference.paged_attention.

A decode row reads its whole context for three multiply-adds per element, so it is bound by memory:
the reference gathers each context into a copy and runs torch's fused attention on queries of a
few rows, where that kernel's fixed costs dominate. The C kernel reads K and V once from the pages.

A sequence with several query rows (a prompt chunk; speculative decoding's verification: the last
token and its drafts) is that many decode rows: row j of n, in a context of L tokens, is a decode
row whose context is its first L - (n - 1 - j) tokens (causality), over the same pages. Prompt
chunks went through the reference's gather and fused attention before; row by row in C was
faster at every size measured (0.45-0.69x the time, 128 to 2048 tokens, SmolLM2's and an 8B model's
head shapes: docs/benchmarks.md), and it makes each row's result independent of the chunk and
batch it comes in (the reference's tiling depends on both), which --batch-invariant needs
(executor/batch_invariance.py). Each row still reads its context itself: a tiled variant that
shares each page among several rows, with every row's sums in the same order, is the next step.
Where C cannot take the tensors (float16, no compiler) the reference does everything.
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


DecodeRows = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
_last: tuple[tuple[torch.Tensor, ...], DecodeRows] | None = None


def decode_rows(cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                 block_tables: torch.Tensor) -> DecodeRows:
    """What the C kernel runs: (order, q_rows, seq_lens, block_tables), one entry per decode row,
    order longest context first (the C side hands rows out in it, so short ones fill in at the
    end). With one-query sequences only, the step's own tensors; with short multi-query ones,
    each of their rows as a decode row of its own. Made once per step: every layer of a step
    passes equal tensors (compared by content)."""
    global _last
    inputs = (cu_seqlens_q, seq_lens, block_tables)
    if _last is not None and all(a.shape == b.shape and torch.equal(a, b)
                                 for a, b in zip(_last[0], inputs)):
        return _last[1]
    cu, lens = cu_seqlens_q.tolist(), seq_lens.tolist()
    spans = [(i, cu[i + 1] - cu[i]) for i in range(len(lens)) if cu[i + 1] > cu[i]]
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
    _last = (tuple(t.clone() for t in inputs), result)
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
                sliding_window, softcap, k_scale, v_scale) -> None:
    lib, _ = load("paged_decode")
    seqs, q_rows, lens, tables = decode_rows(cu_seqlens_q, seq_lens, block_tables)
    if not len(seqs):
        return
    shape = _DecodeShape(q.shape[1], k_cache.shape[2], q.shape[2], k_cache.shape[1], q.stride(0),
                         out.stride(0), tables.stride(0), scale, softcap, sliding_window,
                         KINDS[q.dtype], KINDS[k_cache.dtype], k_scale, v_scale)
    ptrs = [ctypes.c_void_p(t.data_ptr()) for t in (q, k_cache, v_cache, out, seqs,
                                                    q_rows, lens, tables)]
    # every thread: the kernel splits long rows into parts, so one row can use them all
    if lib.paged_decode(*ptrs, len(seqs), omp_threads(), ctypes.byref(shape)):
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
) -> torch.Tensor:
    """kernels.reference.paged_attention, every row computed by the C kernel when it is built
    and the tensors are in a layout it takes (otherwise the reference does everything, whose rows
    depend on their chunk: --batch-invariant checks at load that C takes the model's dtypes)."""
    index = (cu_seqlens_q, seq_lens, block_tables)
    kw = {"scale": scale, "sliding_window": sliding_window, "softcap": softcap,
          "k_scale": k_scale, "v_scale": v_scale}
    if load("paged_decode")[0] is None or not _supported(q, k_cache, v_cache, out, *index):
        attend_spans(q, k_cache, v_cache, *index, out, **kw)
        return out
    _run_decode(q, k_cache, v_cache, out, *index, **kw)
    return out
