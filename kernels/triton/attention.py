"""Paged attention over a varlen batch in Triton; kernels.reference.attention is the specification.

One program owns a tile of query rows of one sequence and one KV head. The GROUP query heads that
share that KV head are stacked in the tile's M dimension, so every K/V tile loaded from the cache
feeds all of them (GQA; MQA is GROUP = num_q_heads):

    tile row m  ->  query token  q_tile_start + m // GROUP,  query head  kv_head * GROUP + m % GROUP
    BLOCK_M rows hold BLOCK_Q = BLOCK_M // GROUP tokens; rows past BLOCK_Q * GROUP are padding.

The program walks its sequence's keys in tiles of BLOCK_N positions; position k lives at page
block_tables[seq, k // block_size], row k % block_size, so a key tile may span several pages or
part of one. Softmax is online, in fp32 and in the log2 domain (exp2). Cache offsets are int64.

Flash-decoding: with NUM_SPLITS > 1 the key tiles of each (query tile, KV head) are divided among
NUM_SPLITS programs, which write unnormalised partial outputs with their running max and sum;
a second kernel (attention_reduce.py) merges them. `num_kv_splits` decides when that pays.
"""

from __future__ import annotations

import functools

import torch
from pagedserve.kernels.triton.attention_reduce import reduce_splits
from pagedserve.kernels.triton.runtime import INTERPRETING, check_device, dot_in_fp32, next_pow2

import triton
import triton.language as tl

MIN_KEYS_PER_SPLIT = 256  # a split reads at least this many keys, so its partials stay cheap
MAX_SPLITS = 64


@triton.jit
def _find_seq(cu_seqlens_q_ptr, tile, num_seqs, BLOCK_Q: tl.constexpr):
    """The sequence that owns global query tile `tile`.

    Sequence i's tiles start at cu_seqlens_q[i] // BLOCK_Q + i, which is strictly increasing in i
    and leaves room for cdiv(q_len_i, BLOCK_Q) tiles before sequence i+1 starts, so the grid is
    num_tokens // BLOCK_Q + num_seqs programs, known on the host without reading device memory.
    Binary search for the last i whose start is <= tile.
    """
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        start = tl.load(cu_seqlens_q_ptr + mid) // BLOCK_Q + mid
        if start <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _dot(a, b, DOT_FP32: tl.constexpr):
    if DOT_FP32:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b)
    return c


@triton.jit
def _scores(q, k, k_pos, q_pos, seq_len, scale, softcap, sliding_window,
            USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr, DOT_FP32: tl.constexpr):
    """Masked logits of one tile in the log2 domain: [BLOCK_M, BLOCK_N] fp32."""
    s = _dot(q, k, DOT_FP32) * scale
    if USE_SOFTCAP:  # softcap * tanh(s / softcap), tanh(x) = 1 - 2 / (exp(2x) + 1)
        s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))
    s = s * 1.4426950408889634  # log2(e)
    allowed = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] < seq_len)
    if USE_WINDOW:
        allowed = allowed & (k_pos[None, :] > q_pos[:, None] - sliding_window)
    return tl.where(allowed, s, float("-inf"))


@triton.jit
def _key_tiles(ctx_len, q_tile_start, q_len, sliding_window, split, BLOCK_Q: tl.constexpr,
               BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, USE_WINDOW: tl.constexpr):
    """The key tiles [tile_lo, tile_hi) this program walks.

    The query tile holds positions ctx_len + q_tile_start .. last; keys [lo, last] can matter
    to some row of it (lo = 0, or the window's start for its first row). Those key tiles are
    cut into NUM_SPLITS contiguous shares; a share may be empty.
    """
    hi = ctx_len + tl.minimum(q_tile_start + BLOCK_Q, q_len)
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(ctx_len + q_tile_start - sliding_window + 1, 0)
    first = lo // BLOCK_N
    num_tiles = tl.cdiv(hi, BLOCK_N) - first
    per_split = tl.cdiv(num_tiles, NUM_SPLITS)
    tile_lo = first + split * per_split
    return tile_lo, tl.minimum(tile_lo + per_split, first + num_tiles)


@triton.jit
def _store_partials(part_acc_ptr, part_ml_ptr, acc, m_i, l_i, tok, head, row_ok, split,
                    GROUP: tl.constexpr, HEAD_DIM_P: tl.constexpr, NUM_SPLITS: tl.constexpr):
    """One split's unnormalised output, running max and sum, for attention_reduce.py."""
    num_q_heads = tl.num_programs(1) * GROUP
    part = (tok * num_q_heads + head) * NUM_SPLITS + split
    tl.store(part_acc_ptr + part[:, None] * HEAD_DIM_P + tl.arange(0, HEAD_DIM_P)[None, :], acc,
             mask=row_ok[:, None])
    tl.store(part_ml_ptr + part * 2, m_i, mask=row_ok)
    tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=row_ok)


@triton.jit
def _paged_attention_kernel(
    q_ptr,  # [num_tokens, num_q_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    cu_seqlens_q_ptr,  # [num_seqs + 1] int32
    seq_lens_ptr,  # [num_seqs] int32
    block_tables_ptr,  # [num_seqs, max_blocks_per_seq] int32
    out_ptr,  # [num_tokens, num_q_heads, head_dim]; written when NUM_SPLITS == 1
    part_acc_ptr,  # [num_tokens, num_q_heads, NUM_SPLITS, HEAD_DIM_P] fp32; NUM_SPLITS > 1
    part_ml_ptr,  # [num_tokens, num_q_heads, NUM_SPLITS, 2] fp32 (max in log2 units, sum)
    scale, softcap, sliding_window, num_seqs,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_bt,
    HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr, USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq = _find_seq(cu_seqlens_q_ptr, tile, num_seqs, BLOCK_Q)
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    q_tile_start = (tile - (q_start // BLOCK_Q + seq)) * BLOCK_Q
    if q_tile_start >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_len = seq_len - q_len  # positions cached before this step

    rows = tl.arange(0, BLOCK_M)
    q_idx = q_tile_start + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows < BLOCK_Q * GROUP) & (q_idx < q_len)
    q_pos = ctx_len + q_idx
    dims = tl.arange(0, HEAD_DIM_P)
    dim_ok = dims < HEAD_DIM
    tok = (q_start + q_idx).to(tl.int64)
    q = tl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)

    tile_lo, tile_hi = _key_tiles(ctx_len, q_tile_start, q_len, sliding_window, split,
                                  BLOCK_Q, BLOCK_N, NUM_SPLITS, USE_WINDOW)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_P], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for t in range(tile_lo, tile_hi):
        k_pos = t * BLOCK_N + tl.arange(0, BLOCK_N)
        k_ok = k_pos < seq_len
        page = tl.load(table + k_pos // BLOCK_SIZE, mask=k_ok, other=0).to(tl.int64)
        k_off = page * stride_kb + (k_pos % BLOCK_SIZE) * stride_kt + kv_head * stride_kh
        v_off = page * stride_vb + (k_pos % BLOCK_SIZE) * stride_vt + kv_head * stride_vh
        k = tl.load(k_cache_ptr + k_off[None, :] + dims[:, None],
                    mask=k_ok[None, :] & dim_ok[:, None], other=0.0)  # [HEAD_DIM_P, BLOCK_N]
        s = _scores(q, k, k_pos, q_pos, seq_len, scale, softcap, sliding_window,
                    USE_SOFTCAP, USE_WINDOW, DOT_FP32)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing allowed yet
        p = tl.exp2(s - m_sub[:, None])
        alpha = tl.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + v_off[:, None] + dims[None, :],
                    mask=k_ok[:, None] & dim_ok[None, :], other=0.0)  # [BLOCK_N, HEAD_DIM_P]
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_FP32)
        m_i = m_new

    if NUM_SPLITS == 1:
        o_ptr = out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :]
        l_i = tl.where(l_i == 0.0, 1.0, l_i)  # padding rows only: every real row sees a key
        tl.store(o_ptr, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & dim_ok[None, :])
    else:
        _store_partials(part_acc_ptr, part_ml_ptr, acc, m_i, l_i, tok, head, row_ok, split,
                        GROUP, HEAD_DIM_P, NUM_SPLITS)


def num_kv_splits(num_seqs: int, num_kv_heads: int, max_seqlen_q: int, max_seqlen_k: int,
                  block_q: int, num_sms: int) -> int:
    """How many programs share one (query tile, KV head)'s keys: the flash-decoding heuristic.

    Splitting pays only when the plain grid cannot fill the GPU and each sequence has many keys:
    a decode-like step (every sequence's queries fit one query tile, max_seqlen_q <= BLOCK_Q)
    with num_seqs * num_kv_heads programs short of ~4 per multiprocessor. Each split keeps at
    least MIN_KEYS_PER_SPLIT keys. Powers of two only, so few variants compile.
    """
    if max_seqlen_q > block_q:
        return 1
    programs = max(num_seqs * num_kv_heads, 1)
    wanted = triton.cdiv(4 * num_sms, programs)
    splits = min(wanted, max_seqlen_k // MIN_KEYS_PER_SPLIT, MAX_SPLITS)
    return 1 if splits < 2 else 1 << (splits.bit_length() - 1)


def _tile_config(head_dim_p: int, group: int, max_seqlen_q: int,
                 dtype: torch.dtype = torch.float16) -> dict:
    """BLOCK_M / BLOCK_N / warps / stages for a step. Decode-like steps get the smallest M tile
    (16 rows, or the group if larger); prefill gets large M tiles for tensor-core work. fp32
    caches (IEEE dots) get half-size tiles: full-size ones spill registers on sm_90."""
    group_p = next_pow2(group)
    decode = max_seqlen_q * group <= max(16, group_p)
    if INTERPRETING:  # small tiles keep interpreted tests quick and still cross tile boundaries
        return {"BLOCK_M": max(16 if decode else 32, group_p), "BLOCK_N": 16,
                "num_warps": 4, "num_stages": 1}
    fp32 = dtype == torch.float32
    if decode:
        block_n = 64 // (2 if head_dim_p > 128 else 1) // (2 if fp32 else 1)
        return {"BLOCK_M": max(16, group_p), "BLOCK_N": block_n,
                "num_warps": 8 if fp32 and head_dim_p >= 64 else 4, "num_stages": 2}
    if fp32:
        tile = 32 if head_dim_p <= 64 else 16
        cfg = {"BLOCK_M": tile, "BLOCK_N": tile, "num_warps": 8 if head_dim_p >= 64 else 4,
               "num_stages": 2}
    elif head_dim_p <= 64:
        cfg = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}
    elif head_dim_p <= 128:
        cfg = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
    else:
        cfg = {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2}
    cfg["BLOCK_M"] = max(cfg["BLOCK_M"], group_p)
    return cfg


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a nominal small GPU, so the split path gets exercised


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
    """Same contract as kernels.reference.paged_attention; launches without a device sync."""
    cfg = _tile_config(next_pow2(max(q.shape[2], 16)), q.shape[1] // k_cache.shape[2],
                       max_seqlen_q, q.dtype)
    keys = min(max_seqlen_k, sliding_window + max_seqlen_q) if sliding_window > 0 else max_seqlen_k
    splits = num_kv_splits(cu_seqlens_q.shape[0] - 1, k_cache.shape[2], max_seqlen_q, keys,
                           cfg["BLOCK_M"] // (q.shape[1] // k_cache.shape[2]), _num_sms(q.device))
    return paged_attention_launch(
        q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, out, scale=scale,
        sliding_window=sliding_window, softcap=softcap, num_splits=splits, **cfg,
    )


def paged_attention_launch(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor, block_tables: torch.Tensor, out: torch.Tensor, *, scale: float,
    sliding_window: int, softcap: float, num_splits: int, BLOCK_M: int, BLOCK_N: int,
    num_warps: int = 4, num_stages: int = 2,
) -> torch.Tensor:
    """paged_attention with the tiling and the number of KV splits chosen by the caller."""
    num_tokens, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_q_heads // num_kv_heads
    assert num_q_heads == group * num_kv_heads, "query heads must be a multiple of KV heads"
    assert k_cache.shape == v_cache.shape and k_cache.shape[3] == head_dim
    assert q.stride(2) == 1 and out.stride(2) == 1 and k_cache.stride(3) == 1
    assert v_cache.stride(3) == 1 and block_tables.stride(1) == 1
    assert block_size & (block_size - 1) == 0, "block_size must be a power of two"
    assert group <= BLOCK_M and num_splits & (num_splits - 1) == 0
    check_device(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, out)
    num_seqs = cu_seqlens_q.shape[0] - 1
    if num_tokens == 0 or num_seqs == 0:
        return out
    head_dim_p = next_pow2(max(head_dim, 16))
    block_q = BLOCK_M // group
    if num_splits > 1:
        part_acc = torch.empty(num_tokens, num_q_heads, num_splits, head_dim_p,
                               dtype=torch.float32, device=q.device)
        part_ml = torch.empty(num_tokens, num_q_heads, num_splits, 2, dtype=torch.float32,
                              device=q.device)
    else:
        part_acc = part_ml = out  # unused
    grid = (num_tokens // block_q + num_seqs, num_kv_heads, num_splits)
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, out, part_acc, part_ml,
        float(scale), float(softcap), int(sliding_window), num_seqs,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        HEAD_DIM=head_dim, HEAD_DIM_P=head_dim_p, BLOCK_SIZE=block_size, GROUP=group,
        BLOCK_M=BLOCK_M, BLOCK_Q=block_q, BLOCK_N=BLOCK_N, NUM_SPLITS=num_splits,
        USE_SOFTCAP=softcap > 0, USE_WINDOW=sliding_window > 0,
        DOT_FP32=dot_in_fp32(q.dtype), num_warps=num_warps, num_stages=num_stages,
    )
    if num_splits > 1:
        reduce_splits(part_acc, part_ml, out)
    return out
