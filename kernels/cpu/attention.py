"""Paged attention on the CPU: decode rows in C (paged_decode.c), prompt chunks through the
reference's fused attention. Same signature and semantics as kernels.reference.paged_attention.

A decode row reads its whole context for three multiply-adds per element, so it is bound by memory:
the reference gathers each context into a copy and runs torch's fused attention on queries of a
few rows, where that kernel's fixed costs dominate. The C kernel reads K and V once from the pages.
Prompt chunks have many query rows per key and stay with the reference (matrix multiplies).
"""

from __future__ import annotations

import ctypes

import torch

from pagedserve.kernels.cpu.build import load, omp_threads
from pagedserve.kernels.reference.attention import attend_spans

_FUNCTIONS = {torch.float32: "paged_decode_f32", torch.bfloat16: "paged_decode_bf16"}


class _DecodeShape(ctypes.Structure):
    _fields_ = [("num_q_heads", ctypes.c_int), ("num_kv_heads", ctypes.c_int),
                ("head_dim", ctypes.c_int), ("block_size", ctypes.c_int),
                ("q_row_stride", ctypes.c_int64), ("out_row_stride", ctypes.c_int64),
                ("block_table_stride", ctypes.c_int64), ("scale", ctypes.c_float),
                ("softcap", ctypes.c_float), ("sliding_window", ctypes.c_int)]


def available() -> tuple[bool, str]:
    """Whether the C kernels built here, and why not."""
    for name in ("paged_decode", "rotary", "norm", "activation", "kv_write"):
        lib, why = load(name)
        if lib is None:
            return False, why
    return True, ""


_last: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


def _decode_seqs(cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
    """The one-query sequences as an int32 tensor, longest context first (the C side hands them
    out in this order, so the short ones fill in at the end), made once per step: every layer of
    a step passes equal tensors (compared by content)."""
    global _last
    if (_last is not None and _last[0].shape == cu_seqlens_q.shape
            and _last[1].shape == seq_lens.shape and torch.equal(_last[0], cu_seqlens_q)
            and torch.equal(_last[1], seq_lens)):
        return _last[2]
    cu, lens = cu_seqlens_q.tolist(), seq_lens.tolist()
    seqs = [i for i in range(len(lens)) if cu[i + 1] - cu[i] == 1]
    seqs.sort(key=lambda i: -lens[i])
    _last = (cu_seqlens_q.clone(), seq_lens.clone(), torch.tensor(seqs, dtype=torch.int32))
    return _last[2]


def _supported(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               out: torch.Tensor, *index: torch.Tensor) -> bool:
    d = q.shape[2]
    return (q.device.type == "cpu" and q.dtype in _FUNCTIONS
            and q.dtype == k_cache.dtype == v_cache.dtype == out.dtype
            and k_cache.is_contiguous() and v_cache.is_contiguous()
            and q.stride()[1:] == (d, 1) and out.stride()[1:] == (d, 1)
            and all(t.dtype == torch.int32 and t.is_contiguous() for t in index))


def _run_decode(q, k_cache, v_cache, out, cu_seqlens_q, seq_lens, block_tables, *, scale,
                sliding_window, softcap) -> None:
    lib, _ = load("paged_decode")
    fn = getattr(lib, _FUNCTIONS[q.dtype])
    seqs = _decode_seqs(cu_seqlens_q, seq_lens)
    if not len(seqs):
        return
    shape = _DecodeShape(q.shape[1], k_cache.shape[2], q.shape[2], k_cache.shape[1], q.stride(0),
                         out.stride(0), block_tables.stride(0), scale, softcap, sliding_window)
    ptrs = [ctypes.c_void_p(t.data_ptr()) for t in (q, k_cache, v_cache, out, seqs,
                                                    cu_seqlens_q, seq_lens, block_tables)]
    if fn(*ptrs, len(seqs), min(omp_threads(), len(seqs)), ctypes.byref(shape)):
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
) -> torch.Tensor:
    """kernels.reference.paged_attention, with decode rows computed by the C kernel when it is
    built and the tensors are in a layout it takes (otherwise the reference does everything)."""
    index = (cu_seqlens_q, seq_lens, block_tables)
    in_c = load("paged_decode")[0] is not None and _supported(q, k_cache, v_cache, out, *index)
    if in_c and max_seqlen_q > 1:
        attend_spans(q, k_cache, v_cache, *index, out, scale=scale,
                     sliding_window=sliding_window, softcap=softcap, decode=False)
    elif not in_c:
        attend_spans(q, k_cache, v_cache, *index, out, scale=scale,
                     sliding_window=sliding_window, softcap=softcap)
        return out
    _run_decode(q, k_cache, v_cache, out, *index, scale=scale, sliding_window=sliding_window,
                softcap=softcap)
    return out
