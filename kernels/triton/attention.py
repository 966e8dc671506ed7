"""Paged attention over a varlen batch in Triton; kernels.reference.attention is the specification.

One program owns a tile of query rows of one sequence and one KV head. The GROUP query heads that
share that KV head are stacked in the tile's M dimension, so every K/V tile loaded from the cache
feeds all of them (GQA; MQA is GROUP = num_q_heads):

    tile row m  ->  query token  q_tile_start + m // GROUP,  query head  kv_head * GROUP + m % GROUP
    BLOCK_M rows hold BLOCK_Q = BLOCK_M // GROUP tokens; rows past BLOCK_Q * GROUP are padding.

The program walks its sequence's keys in tiles of BLOCK_N positions; position k lives at page
block_tables[seq, k // block_size], row k % block_size, so a key tile may span several pages or
part of one. Softmax is online, in fp32 and in the log2 domain (exp2). Cache offsets are int64.
Only the key tiles that straddle the causal diagonal, the context's end or the window's edge are
masked; the tiles every row of the query tile sees whole (most of a long context) run unmasked.

Flash-decoding: with NUM_SPLITS > 1 the key tiles of each (query tile, KV head) are divided among
NUM_SPLITS programs, which write unnormalised partial outputs with their running max and sum into
reused workspaces; a second kernel (attention_reduce.py) merges them. attention_tiles.py picks
the tiling and the split count (a function of the batch-size bucket only).

A cache narrower than q (bf16 under float32 queries, or fp8 e4m3, passed as its bytes) is widened
to q's dtype as each tile is loaded (fp8 exactly: e4m3 values are bf16 and fp16 values); an fp8
cache's k_scale is folded into the score scale and v_scale into the output.
"""

from __future__ import annotations

import functools

import torch

import triton
import triton.language as tl
from pagedserve.kernels.triton.attention_reduce import reduce_splits
from pagedserve.kernels.triton.attention_tiles import is_decode, num_kv_splits, tile_config
from pagedserve.kernels.triton.runtime import check_device, dot_in_fp32, next_pow2


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
def e4m3_to_f32(x):
    """e4m3 bits (uint8) -> fp32: rearranged into fp16's bits (exponent bias 15, 8 more than
    e4m3's; fp16 holds e4m3's subnormals as its own), widened, times 2^8; 0x7f / 0xff are NaN."""
    h = x.to(tl.uint16)
    h = ((h & 0x80) << 8) | ((h & 0x7F) << 7)
    f = h.to(tl.float16, bitcast=True).to(tl.float32) * 256.0
    return tl.where((x & 0x7F) == 0x7F, float("nan"), f)


@triton.jit
def _widen(x, dtype, KV_FP8: tl.constexpr):
    """A loaded K/V tile in q's dtype."""
    if KV_FP8:
        x = e4m3_to_f32(x)
    return x.to(dtype)


@triton.jit
def _scores(q, k, k_pos, q_pos, seq_len, scale, softcap, sliding_window, MASKED: tl.constexpr,
            USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr, DOT_FP32: tl.constexpr):
    """Logits of one tile in the log2 domain, [BLOCK_M, BLOCK_N] fp32; -inf where a row may not
    see a key, when the tile is MASKED (a tile every row sees whole skips the compare)."""
    s = _dot(q, k, DOT_FP32) * scale
    if USE_SOFTCAP:  # softcap * tanh(s / softcap), tanh(x) = 1 - 2 / (exp(2x) + 1)
        s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))
    s = s * 1.4426950408889634  # log2(e)
    if MASKED:
        allowed = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] < seq_len)
        if USE_WINDOW:
            allowed = allowed & (k_pos[None, :] > q_pos[:, None] - sliding_window)
        s = tl.where(allowed, s, float("-inf"))
    return s


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
def _whole_tiles(q_first, q_last, tile_lo, tile_hi, sliding_window, BLOCK_N: tl.constexpr,
                 USE_WINDOW: tl.constexpr):
    """[a, b) inside [tile_lo, tile_hi): the key tiles every query row of the tile sees whole,
    which need no mask. Rows sit at positions q_first..q_last.

        key tiles:  | window edge, masked | whole, unmasked | diagonal, masked |
                    tile_lo               a                 b                  tile_hi

    Tile t is whole when its last key (t + 1) * BLOCK_N - 1 <= q_first (causal for every row,
    and inside the context, which ends past q_last) and, with a window, its first key
    t * BLOCK_N > q_last - sliding_window. Without a window a = tile_lo.
    """
    a = tile_lo
    if USE_WINDOW:
        edge = tl.cdiv(tl.maximum(q_last - sliding_window + 1, 0), BLOCK_N)
        a = tl.minimum(tl.maximum(edge, tile_lo), tile_hi)
    b = tl.minimum(tl.maximum((q_first + 1) // BLOCK_N, a), tile_hi)
    return a, b


@triton.jit
def _tile_runs(ctx_len, q_tile_start, q_len, sliding_window, split, BLOCK_Q: tl.constexpr,
               BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, USE_WINDOW: tl.constexpr):
    """This program's key tiles as three runs: [lo, a) masked, [a, b) whole, [b, hi) masked."""
    lo, hi = _key_tiles(ctx_len, q_tile_start, q_len, sliding_window, split, BLOCK_Q, BLOCK_N,
                        NUM_SPLITS, USE_WINDOW)
    q_last = ctx_len + tl.minimum(q_tile_start + BLOCK_Q, q_len) - 1
    a, b = _whole_tiles(ctx_len + q_tile_start, q_last, lo, hi, sliding_window, BLOCK_N,
                        USE_WINDOW)
    return lo, a, b, hi


@triton.jit
def _attend_tile(acc, m_i, l_i, q, t, table, seq_len, q_pos, dims, dim_ok, k_head, v_head,
                 scale, softcap, sliding_window, stride_kb, stride_kt, stride_vb, stride_vt,
                 BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                 USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr, DOT_FP32: tl.constexpr,
                 KV_FP8: tl.constexpr):
    """Key tile t into the online softmax; -> (acc, m_i, l_i). k_head / v_head: the caches
    offset to this KV head. Unless MASKED, every key of the tile is inside the context and
    visible to every row: loads and logits go unmasked."""
    k_pos = t * BLOCK_N + tl.arange(0, BLOCK_N)
    if MASKED:
        k_ok = k_pos < seq_len
        page = tl.load(table + k_pos // BLOCK_SIZE, mask=k_ok, other=0).to(tl.int64)
        k_mask = k_ok[None, :] & dim_ok[:, None]
        v_mask = k_ok[:, None] & dim_ok[None, :]
    else:
        page = tl.load(table + k_pos // BLOCK_SIZE).to(tl.int64)
        k_mask = dim_ok[:, None]
        v_mask = dim_ok[None, :]
    k_off = page * stride_kb + (k_pos % BLOCK_SIZE) * stride_kt
    v_off = page * stride_vb + (k_pos % BLOCK_SIZE) * stride_vt
    k = _widen(tl.load(k_head + k_off[None, :] + dims[:, None], mask=k_mask, other=0), q.dtype,
               KV_FP8)
    s = _scores(q, k, k_pos, q_pos, seq_len, scale, softcap, sliding_window, MASKED,
                USE_SOFTCAP, USE_WINDOW, DOT_FP32)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing allowed yet
    p = tl.exp2(s - m_sub[:, None])
    alpha = tl.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _widen(tl.load(v_head + v_off[:, None] + dims[None, :], mask=v_mask, other=0), q.dtype,
               KV_FP8)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_FP32)
    return acc, m_new, l_i


@triton.jit
def _store_partials(part_acc_ptr, part_ml_ptr, acc, m_i, l_i, tok, head, row_ok, split,
                    v_scale, GROUP: tl.constexpr, HEAD_DIM_P: tl.constexpr,
                    NUM_SPLITS: tl.constexpr):
    """One split's unnormalised output (times v_scale: the merge is linear in it), running max
    and sum, for attention_reduce.py."""
    num_q_heads = tl.num_programs(1) * GROUP
    part = (tok * num_q_heads + head) * NUM_SPLITS + split
    tl.store(part_acc_ptr + part[:, None] * HEAD_DIM_P + tl.arange(0, HEAD_DIM_P)[None, :],
             acc * v_scale, mask=row_ok[:, None])
    tl.store(part_ml_ptr + part * 2, m_i, mask=row_ok)
    tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=row_ok)


@triton.jit
def _store_out(out_ptr, acc, l_i, tok, head, row_ok, dims, dim_ok, stride_ot, stride_oh,
               v_scale):
    o_ptr = out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :]
    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # padding rows only: every real row sees a key
    tl.store(o_ptr, (acc / l_i[:, None] * v_scale).to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & dim_ok[None, :])


# Triton compiles a variant per value class of each int argument (== 1, divisible by 16, other)
# and per 16-byte alignment of each pointer. num_seqs and the block-table stride (its width
# follows the longest context) change every step, and the step's metadata may be slices of one
# packed buffer at offsets that change too: none of them may pick a variant. The sliding window
# is a per-layer constant, but only USE_WINDOW matters to the code. Strides of q/out and of the
# caches stay specialised: they are fixed per model and their divisibility vectorises loads.
STEP_INTS = ["num_seqs", "stride_bt", "sliding_window"]
STEP_POINTERS = ["cu_seqlens_q_ptr", "seq_lens_ptr", "block_tables_ptr"]


@triton.jit(do_not_specialize=STEP_INTS, do_not_specialize_on_alignment=STEP_POINTERS)
def _paged_attention_kernel(
    q_ptr,  # [num_tokens, num_q_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]; uint8 bits when KV_FP8
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    cu_seqlens_q_ptr,  # [num_seqs + 1] int32
    seq_lens_ptr,  # [num_seqs] int32
    block_tables_ptr,  # [num_seqs, max_blocks_per_seq] int32
    out_ptr,  # [num_tokens, num_q_heads, head_dim]; written when NUM_SPLITS == 1
    part_acc_ptr,  # [num_tokens, num_q_heads, NUM_SPLITS, HEAD_DIM_P] fp32; NUM_SPLITS > 1
    part_ml_ptr,  # [num_tokens, num_q_heads, NUM_SPLITS, 2] fp32 (max in log2 units, sum)
    scale, softcap, sliding_window, num_seqs, v_scale,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_bt,
    HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr, USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr,
    DOT_FP32: tl.constexpr, KV_FP8: tl.constexpr,
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

    lo, a, b, hi = _tile_runs(ctx_len, q_tile_start, q_len, sliding_window, split, BLOCK_Q,
                              BLOCK_N, NUM_SPLITS, USE_WINDOW)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_P], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k_head = k_cache_ptr + kv_head * stride_kh
    v_head = v_cache_ptr + kv_head * stride_vh
    # The runs in key order (so the sums are those of one masked pass): the window's edge, the
    # tiles every row sees whole, then the diagonal and the context's end.
    if USE_WINDOW:
        for t in range(lo, a):
            acc, m_i, l_i = _attend_tile(
                acc, m_i, l_i, q, t, table, seq_len, q_pos, dims, dim_ok, k_head, v_head, scale,
                softcap, sliding_window, stride_kb, stride_kt, stride_vb, stride_vt, BLOCK_SIZE,
                BLOCK_N, True, USE_SOFTCAP, USE_WINDOW, DOT_FP32, KV_FP8)
    for t in range(a, b):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, t, table, seq_len, q_pos, dims, dim_ok, k_head, v_head, scale,
            softcap, sliding_window, stride_kb, stride_kt, stride_vb, stride_vt, BLOCK_SIZE,
            BLOCK_N, False, USE_SOFTCAP, USE_WINDOW, DOT_FP32, KV_FP8)
    for t in range(b, hi):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, t, table, seq_len, q_pos, dims, dim_ok, k_head, v_head, scale,
            softcap, sliding_window, stride_kb, stride_kt, stride_vb, stride_vt, BLOCK_SIZE,
            BLOCK_N, True, USE_SOFTCAP, USE_WINDOW, DOT_FP32, KV_FP8)

    if NUM_SPLITS == 1:
        _store_out(out_ptr, acc, l_i, tok, head, row_ok, dims, dim_ok, stride_ot, stride_oh,
                   v_scale)
    else:
        _store_partials(part_acc_ptr, part_ml_ptr, acc, m_i, l_i, tok, head, row_ok, split,
                        v_scale, GROUP, HEAD_DIM_P, NUM_SPLITS)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a nominal small GPU, so the split path gets exercised


def launch_plan(num_seqs: int, num_q_heads: int, num_kv_heads: int, head_dim: int,
                dtype: torch.dtype, max_seqlen_q: int, device: torch.device) -> tuple[dict, int]:
    """(tile config, number of KV splits) for a step; precompile.warmup enumerates the same."""
    group = num_q_heads // num_kv_heads
    cfg = tile_config(next_pow2(max(head_dim, 16)), group, max_seqlen_q, dtype)
    if not is_decode(group, max_seqlen_q):
        return cfg, 1
    return cfg, num_kv_splits(num_seqs, num_kv_heads, _num_sms(device))


# Split partials live in grow-only fp32 workspaces, one pair per device, reused by every layer
# and step: a CUDA graph captured over a decode step keeps pointing at valid memory. Launches on
# one device run in stream order (the executor steps on one stream), so reuse never races.
# Replaced workspaces stay referenced, as a graph may hold them; sizes grow by powers of two.
_WORKSPACES: dict[tuple[torch.device, str], torch.Tensor] = {}
_RETIRED: list[torch.Tensor] = []


def _workspace(device: torch.device, name: str, numel: int) -> torch.Tensor:
    buf = _WORKSPACES.get((device, name))
    if buf is None or buf.numel() < numel:
        if buf is not None:
            _RETIRED.append(buf)
        buf = torch.empty(next_pow2(numel), dtype=torch.float32, device=device)
        _WORKSPACES[(device, name)] = buf
    return buf[:numel]


def split_partials(device: torch.device, num_tokens: int, num_q_heads: int, num_splits: int,
                   head_dim_p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of the workspaces: partial outputs [T, H, S, Dp] and (max, sum) pairs [T, H, S, 2]."""
    rows = num_tokens * num_q_heads * num_splits
    acc = _workspace(device, "acc", rows * head_dim_p)
    ml = _workspace(device, "ml", rows * 2)
    return (acc.view(num_tokens, num_q_heads, num_splits, head_dim_p),
            ml.view(num_tokens, num_q_heads, num_splits, 2))


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
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Same contract as kernels.reference.paged_attention; launches without a device sync.
    max_seqlen_k is not needed: split counts follow the batch-size bucket alone."""
    cfg, splits = launch_plan(cu_seqlens_q.shape[0] - 1, q.shape[1], k_cache.shape[2], q.shape[2],
                              q.dtype, max_seqlen_q, q.device)
    return paged_attention_launch(
        q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, out, scale=scale,
        sliding_window=sliding_window, softcap=softcap, num_splits=splits, k_scale=k_scale,
        v_scale=v_scale, **cfg,
    )


def paged_attention_launch(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor, block_tables: torch.Tensor, out: torch.Tensor, *, scale: float,
    sliding_window: int, softcap: float, num_splits: int, BLOCK_M: int, BLOCK_N: int,
    num_warps: int = 4, num_stages: int = 2, k_scale: float = 1.0, v_scale: float = 1.0,
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
    part_acc = part_ml = out  # unused with one split
    if num_splits > 1:
        part_acc, part_ml = split_partials(q.device, num_tokens, num_q_heads, num_splits,
                                           head_dim_p)
    grid = (num_tokens // block_q + num_seqs, num_kv_heads, num_splits)
    kv_fp8 = k_cache.dtype == torch.float8_e4m3fn
    if kv_fp8:  # read as bytes and widened in the kernel (the interpreter has no fp8 type)
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, out, part_acc, part_ml,
        float(scale * k_scale), float(softcap), int(sliding_window), num_seqs, float(v_scale),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        HEAD_DIM=head_dim, HEAD_DIM_P=head_dim_p, BLOCK_SIZE=block_size, GROUP=group,
        BLOCK_M=BLOCK_M, BLOCK_Q=block_q, BLOCK_N=BLOCK_N, NUM_SPLITS=num_splits,
        USE_SOFTCAP=softcap > 0, USE_WINDOW=sliding_window > 0,
        DOT_FP32=dot_in_fp32(q.dtype), KV_FP8=kv_fp8, num_warps=num_warps,
        num_stages=num_stages,
    )
    if num_splits > 1:
        reduce_splits(part_acc, part_ml, out)
    return out
