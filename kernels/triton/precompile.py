"""Compile, at start-up, every attention variant a step can launch, so none compiles mid-serving.

A variant is a tile configuration (decode or prefill), a window flag and a split count; with the
per-step integers unspecialised (attention.STEP_INTS) nothing else about a step picks one:

    decode config  x  split counts of the batch buckets 1, 2, 4, .. >= max_num_seqs (and 1)
    prefill config x  1 split
    (each)         x  window or not, as the model's layers have them
    the split merge for every split count > 1

The elementwise kernels (norm, rotary, kv_write, activation) have one variant per model and
compile in the first forward pass (the executor's memory profile, where there is one).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import torch

from pagedserve.kernels.triton.attention import (
    _num_sms,
    launch_plan,
    paged_attention_launch,
    split_partials,
)
from pagedserve.kernels.triton.attention_tiles import (
    batch_bucket,
    decode_split_counts,
    num_kv_splits,
)
from pagedserve.kernels.triton.runtime import INTERPRETING, next_pow2
from pagedserve.kernels.triton.variants import intercept

log = logging.getLogger(__name__)


def attention_variants(num_q_heads: int, num_kv_heads: int, max_num_seqs: int,
                       device: torch.device) -> list[tuple[int, int]]:
    """(max_seqlen_q, num_splits) pairs that reach every tile config and split count."""
    group = num_q_heads // num_kv_heads
    prefill_q = max(16, next_pow2(group)) // group + 1  # the shortest step past the decode tile
    splits = decode_split_counts(max_num_seqs, num_kv_heads, _num_sms(device))
    return [(1, s) for s in splits] + [(prefill_q, 1)]


def reserve_split_partials(num_q_heads: int, num_kv_heads: int, head_dim: int,
                           dtype: torch.dtype, max_num_seqs: int, device: torch.device) -> None:
    """Size the split workspaces for the largest decode step, so they never move later (a CUDA
    graph holds their addresses). A decode step has at most block_q query rows per sequence;
    the workspaces hold tokens x splits rows per head."""
    cfg, _ = launch_plan(1, num_q_heads, num_kv_heads, head_dim, dtype, 1, device)
    block_q = cfg["BLOCK_M"] // (num_q_heads // num_kv_heads)
    need, bucket = 1, 1
    while bucket <= batch_bucket(max_num_seqs):
        splits = num_kv_splits(bucket, num_kv_heads, _num_sms(device))
        need = max(need, min(bucket, max_num_seqs) * block_q * splits)
        bucket *= 2
    split_partials(device, need, num_q_heads, 1, next_pow2(max(head_dim, 16)))


def _launch_variant(q_dummy, k_cache, v_cache, max_q: int, splits: int, window: int,
                    softcap: float) -> None:
    """One launch of a variant on a one-sequence step of max_q tokens at block 0."""
    device, block_size = k_cache.device, k_cache.shape[1]
    num_q_heads, head_dim = q_dummy.shape[1], q_dummy.shape[2]
    cfg, _ = launch_plan(1, num_q_heads, k_cache.shape[2], head_dim, q_dummy.dtype, max_q, device)
    q = q_dummy[:max_q]
    cu = torch.tensor([0, max_q], dtype=torch.int32, device=device)
    lens = torch.tensor([max_q], dtype=torch.int32, device=device)
    tables = torch.zeros(1, -(-max_q // block_size), dtype=torch.int32, device=device)
    out = torch.empty(q.shape, dtype=q.dtype, device=device)  # as the attention layer makes it
    paged_attention_launch(q, k_cache, v_cache, cu, lens, tables, out,
                           scale=head_dim**-0.5, sliding_window=window, softcap=softcap,
                           num_splits=splits, **cfg)


def _qkv_like(tokens: int, num_q_heads: int, num_kv_heads: int, head_dim: int,
              dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """q as the model hands it over: a view into the fused QKV projection's output (its row
    stride is part of what triton specialises on)."""
    width = (num_q_heads + 2 * num_kv_heads) * head_dim
    qkv = torch.zeros(tokens, width, dtype=dtype, device=device)
    return qkv[:, : num_q_heads * head_dim].view(tokens, num_q_heads, head_dim)


def compile_launches(launches: list, threads: int = 8, retry_serially: bool = True) -> None:
    """Run the launches in triton's compile-only mode, compiling in parallel threads where this
    triton offers asynchronous compilation (the compiler mostly runs outside the GIL). A
    failure retries one by one (so a compile error surfaces with a plain traceback), unless
    retry_serially is False, when it is raised at once."""
    try:
        from triton.runtime._async_compile import AsyncCompileMode
    except ImportError:
        threads = 0
    with intercept(mode="compile"):
        if threads > 1 and not INTERPRETING:
            try:
                with ThreadPoolExecutor(threads) as pool, AsyncCompileMode(pool):
                    for launch in launches:
                        launch()
                return
            except Exception:
                if not retry_serially:
                    raise
                log.warning("parallel kernel compilation failed; compiling one by one",
                            exc_info=True)
        for launch in launches:
            launch()


def warmup(k_cache: torch.Tensor, v_cache: torch.Tensor, *, num_q_heads: int,
           max_num_seqs: int, sliding_windows: Iterable[int] = (0,), softcap: float = 0.0,
           dtype: torch.dtype | None = None, threads: int = 8) -> int:
    """Compile every paged-attention variant this model's steps can launch; returns how many.

    k_cache / v_cache: one layer's real caches (their strides and alignment are part of each
    variant). num_q_heads: query heads on this rank. sliding_windows: the layers' windows (0 =
    none). dtype: of q, default the cache's. Call once, after set_tile_settings and before the
    first step or any CUDA graph capture, from the thread that will step the model, while no
    other thread launches kernels (launches are switched to compile-only meanwhile). Nothing
    runs on the device and the cache is not read.
    Under the interpreter the launches compile nothing (tests record them instead).
    """
    t0 = time.perf_counter()
    if dtype is None and k_cache.element_size() == 1:
        raise ValueError("dtype: an fp8 cache's queries have another dtype; pass q's")
    dtype = dtype or k_cache.dtype
    num_kv_heads, head_dim, device = k_cache.shape[2], k_cache.shape[3], k_cache.device
    variants = attention_variants(num_q_heads, num_kv_heads, max_num_seqs, device)
    q = _qkv_like(max(m for m, _ in variants), num_q_heads, num_kv_heads, head_dim, dtype,
                  device)
    given = list(sliding_windows)  # of the code, only whether a window is on differs
    windows = [0] * any(w <= 0 for w in given) + sorted(w for w in given if w > 0)[:1]
    launches = [lambda m=m, s=s, w=w: _launch_variant(q, k_cache, v_cache, m, s, w, softcap)
                for w in windows for m, s in variants]
    compile_launches(launches, threads)
    reserve_split_partials(num_q_heads, num_kv_heads, head_dim, dtype, max_num_seqs, device)
    log.info("attention kernels: %d variants ready in %.1f s", len(launches),
             time.perf_counter() - t0)
    return len(launches)
