"""Triton paged attention against the reference on fresh random ragged batches.

The cache is NaN everywhere outside the contexts and the output is NaN before the call, so a
kernel that reads past a context, or skips a row, fails. Shapes are small on the CPU (the
interpreter is slow) and larger on a GPU."""

from __future__ import annotations

import pytest
import torch

from pagedserve.kernels import reference
from tests.kernels.common import (
    DEVICE,
    DTYPES,
    ON_GPU,
    TOL,
    PagedBatch,
    fill_context,
    make_batch,
    poisoned,
    rel_err,
)

pytestmark = pytest.mark.triton

SCALE_GPU = 8 if ON_GPU else 1  # contexts and queries grow on a GPU


def _check(tk, batch, dtype, *, window=0, softcap=0.0, launch=None) -> None:
    scale = batch.q.shape[2] ** -0.5
    kw = {"scale": scale, "sliding_window": window, "softcap": softcap}
    ref = reference.paged_attention(*batch.args(), poisoned(batch.q.shape, dtype), **kw,
                                    **batch.bounds())
    out = poisoned(batch.q.shape, dtype)
    if launch is None:
        tk.paged_attention(*batch.args(), out, **kw, **batch.bounds())
    else:
        from pagedserve.kernels.triton.attention import paged_attention_launch

        paged_attention_launch(*batch.args(), out, **kw, **launch)
    assert rel_err(out, ref) < TOL[dtype]


def _scaled(lens: list[int]) -> list[int]:
    return [n * SCALE_GPU for n in lens]


# (q_lens, seq_lens): 1-token contexts, contexts ending on / just past a block boundary (16),
# prefill from position 0, chunked prefill over a cached prefix, empty query ranges, long ones.
BATCHES = {
    "decode": ([1, 1, 1, 1, 1], [1, 15, 16, 17, 70]),
    "mixed": ([7, 1, 33, 0, 1], [7, 40, 50, 9, 2]),
    "prefill": ([16, 31], [16, 47]),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(BATCHES))
def test_ragged_batches_gqa4(tk, dtype, name) -> None:
    q_lens, seq_lens = BATCHES[name]
    seq_lens = [sl - ql + ql * SCALE_GPU if ql > 1 else sl * SCALE_GPU
                for ql, sl in zip(q_lens, seq_lens)]
    q_lens = [ql * SCALE_GPU if ql > 1 else ql for ql in q_lens]
    batch = make_batch(q_lens, seq_lens, num_q_heads=8, num_kv_heads=2, head_dim=32,
                       block_size=16, dtype=dtype)
    _check(tk, batch, dtype)


@pytest.mark.parametrize(("num_q_heads", "num_kv_heads", "head_dim", "block_size"), [
    (4, 4, 48, 16),  # no grouping; head size padded 48 -> 64
    (16, 2, 64, 8),  # GQA 8; pages smaller than the key tile
    (6, 2, 80, 32),  # GQA 3 (group not a power of two); pages larger than the key tile
    (4, 1, 16, 16),  # MQA
])
def test_head_layouts_with_shared_prefix_blocks(tk, num_q_heads, num_kv_heads, head_dim,
                                                block_size) -> None:
    dtype = torch.float16
    batch = make_batch([1, 9, 1], _scaled([40, 37, 20]), num_q_heads=num_q_heads,
                       num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=block_size,
                       dtype=dtype, shared_blocks=16 // block_size + 1)
    _check(tk, batch, dtype)


@pytest.mark.parametrize("head_dim", [96, 128, 256])
def test_large_head_sizes(tk, head_dim) -> None:
    batch = make_batch([1, 5], _scaled([30, 18]), num_q_heads=4, num_kv_heads=2,
                       head_dim=head_dim, block_size=16, dtype=torch.float16)
    _check(tk, batch, torch.float16)


@pytest.mark.parametrize(("window", "softcap"), [(5, 0.0), (13, 30.0), (500, 0.0), (0, 5.0)])
def test_sliding_window_and_softcap(tk, window, softcap) -> None:
    # Windows shorter than the contexts (5, 13) and longer than all of them (500).
    batch = make_batch([1, 20, 1, 3], _scaled([45, 33, 6, 60]), num_q_heads=4, num_kv_heads=1,
                       head_dim=32, block_size=32, dtype=torch.float32)
    _check(tk, batch, torch.float32, window=window, softcap=softcap)


@pytest.mark.parametrize(("num_splits", "window", "softcap"), [(2, 0, 0.0), (4, 20, 0.0),
                                                                (8, 0, 10.0)])
def test_split_kv_path(tk, num_splits, window, softcap) -> None:
    # Contexts of 3 and 5 tokens give some splits no key tile at all: they must merge as empty.
    dtype = torch.float16
    batch = make_batch([1, 1, 1, 2], _scaled([3, 100, 64, 5]), num_q_heads=8, num_kv_heads=2,
                       head_dim=32, block_size=16, dtype=dtype)
    launch = {"num_splits": num_splits, "BLOCK_M": 16, "BLOCK_N": 16}
    _check(tk, batch, dtype, window=window, softcap=softcap, launch=launch)


def test_heuristic_splits_long_decode(tk) -> None:
    from pagedserve.kernels.triton.attention import launch_plan

    batch = make_batch([1, 1], _scaled([600, 300]), num_q_heads=4, num_kv_heads=1,
                       head_dim=32, block_size=16, dtype=torch.float32)
    assert launch_plan(2, 4, 1, 32, torch.float32, 1, batch.q.device)[1] > 1
    _check(tk, batch, torch.float32)


def test_split_counts_follow_the_batch_bucket_only() -> None:
    """One split count per batch-size bucket, whatever the contexts: a graph captured for a
    bucket sees one grid. Prefill-like steps never split."""
    from pagedserve.kernels.triton.attention import launch_plan
    from pagedserve.kernels.triton.attention_tiles import batch_bucket, num_kv_splits

    assert num_kv_splits(1, 8, num_sms=132) == 64  # batch 1: fill the GPU along the keys
    assert num_kv_splits(3, 8, num_sms=132) == 16  # bucket 4
    assert num_kv_splits(32, 8, num_sms=132) == 2
    assert num_kv_splits(128, 8, num_sms=132) == 1  # grid already full
    for n in range(1, 300):
        assert num_kv_splits(n, 8, 132) == num_kv_splits(batch_bucket(n), 8, 132)
    cpu = torch.device("cpu")
    assert launch_plan(1, 32, 8, 64, torch.float16, 512, cpu)[1] == 1  # prefill
    assert launch_plan(1, 32, 8, 64, torch.float16, 1, cpu)[1] == num_kv_splits(1, 8, 4)


def test_split_workspaces_are_reused_across_steps(tk) -> None:
    """Split partials go to persistent workspaces (no allocation per call, fixed addresses for
    graph capture): two decode steps of different batch size, same buffers, right answers."""
    from pagedserve.kernels.triton import attention

    dtype = torch.float16
    ptrs = []
    for seq_lens in ([90, 200], [150]):  # buckets 2 and 1: splits x sequences is the same
        batch = make_batch([1] * len(seq_lens), _scaled(seq_lens), num_q_heads=4,
                           num_kv_heads=1, head_dim=32, block_size=16, dtype=dtype)
        _, splits = attention.launch_plan(len(seq_lens), 4, 1, 32, dtype, 1, batch.q.device)
        assert splits > 1
        _check(tk, batch, dtype)
        ptrs.append({key: buf.data_ptr() for key, buf in attention._WORKSPACES.items()})
    assert ptrs[0] == ptrs[1] and len(ptrs[0]) == 2


# Whole prompts whose lengths are and are not multiples of the key tile, and chunks over a cached
# prefix ending on and off tile boundaries, so query tiles meet the diagonal at every offset.
PREFILL = {
    "tile_multiples": ([16, 32, 48], [16, 32, 48]),
    "off_tile": ([17, 31, 33], [17, 31, 33]),
    "chunked": ([16, 20, 7, 1], [32, 37, 64, 50]),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name", sorted(PREFILL))
@pytest.mark.parametrize(("heads", "block_m", "block_n"), [((8, 2), 32, 16), ((8, 2), 16, 32),
                                                             ((4, 2), 64, 16)])
def test_prefill_whole_tiles_unmasked_diagonal_masked(tk, dtype, name, heads, block_m,
                                                      block_n) -> None:
    """Prefill walks the key tiles every query row sees whole without a mask, then the diagonal
    ones with it: the same answer as the reference for every tile-to-diagonal offset, GQA."""
    q_lens, seq_lens = PREFILL[name]
    batch = make_batch(q_lens, seq_lens, num_q_heads=heads[0], num_kv_heads=heads[1],
                       head_dim=32, block_size=16, dtype=dtype)
    launch = {"num_splits": 1, "BLOCK_M": block_m, "BLOCK_N": block_n}
    _check(tk, batch, dtype, launch=launch)


@pytest.mark.parametrize("window", [24, 40])
def test_window_edge_whole_and_diagonal_tiles(tk, window) -> None:
    """A window shorter than the context: masked tiles at its edge, whole tiles, the diagonal."""
    batch = make_batch([1, 30, 1, 5], [100, 100, 57, 70], num_q_heads=4, num_kv_heads=2,
                       head_dim=32, block_size=16, dtype=torch.float32)
    for splits in (1, 2):
        launch = {"num_splits": splits, "BLOCK_M": 16, "BLOCK_N": 16}
        _check(tk, batch, torch.float32, window=window, launch=launch)


def test_cache_offsets_beyond_int32(tk) -> None:
    """Pages whose element offset exceeds 2^31 (4 GiB of fp16 cache): allocated but never touched
    outside the pages in use, so on the CPU it stays lazily mapped; K and V share it."""
    block_size, heads, head_dim = 16, 1, 16
    num_blocks = 2**31 // (block_size * heads * head_dim) + 64
    cache = torch.empty(num_blocks, block_size, heads, head_dim, dtype=torch.float16,
                        device=DEVICE)
    seq_lens = [40, 1]
    table = torch.tensor([[num_blocks - 1, 5, num_blocks - 40], [num_blocks - 3, -1, -1]],
                         dtype=torch.int32)
    for block in table[table >= 0].tolist():
        cache[block] = float("nan")
    fill_context(cache, table, seq_lens)
    cu = torch.tensor([0, 3, 4], dtype=torch.int32)
    q = torch.randn(4, 2, head_dim).half()
    batch = PagedBatch(*(t.to(DEVICE) for t in (q, cache, cache, cu, torch.tensor(seq_lens),
                                                 table)), max_seqlen_q=3, max_seqlen_k=40)
    batch.seq_lens = batch.seq_lens.int()
    _check(tk, batch, torch.float16)
