"""How paged attention tiles a step, and how many programs share one sequence's keys.

Tile settings are per head size and dtype: a decode step (a few query rows per sequence) walks
keys in BLOCK_N tiles with a 16-row M tile; a prefill step uses large M tiles for tensor cores.
`TileSettings` holds the tunable numbers with today's values as defaults; `set_tile_settings`
injects measured ones (bench/kernels.py --sweep prints them), and every launch reads them here.

Split-KV (flash-decoding) counts depend only on the batch-size bucket (num_seqs rounded up to a
power of two), never on context lengths: a CUDA graph captured for a bucket then sees one grid
and one NUM_SPLITS, and the few variants compile once at start-up (precompile.warmup).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from pagedserve.kernels.triton.runtime import INTERPRETING, next_pow2

MAX_SPLITS = 64


@dataclass(frozen=True)
class TileSettings:
    """Tiling for one (padded head size, dtype). Block sizes are powers of two >= 16 (tl.dot)."""

    decode_block_n: int = 64
    decode_num_warps: int = 4
    decode_num_stages: int = 2
    prefill_block_m: int = 64
    prefill_block_n: int = 64
    prefill_num_warps: int = 4
    prefill_num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("decode_block_n", "prefill_block_m", "prefill_block_n", "decode_num_warps",
                     "prefill_num_warps"):
            value = getattr(self, name)
            assert value >= 1 and value & (value - 1) == 0, f"{name}={value}: not a power of two"
        assert min(self.decode_block_n, self.prefill_block_m, self.prefill_block_n) >= 16
        assert self.decode_num_stages >= 1 and self.prefill_num_stages >= 1

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def default_tiles(head_dim_p: int, dtype: torch.dtype) -> TileSettings:
    """The untuned starting point. fp32 caches (IEEE dots) get half-size tiles: full-size ones
    spill registers on sm_90. The interpreter gets small tiles: quick, yet tiles still cross
    page and query boundaries in small tests."""
    if INTERPRETING:
        return TileSettings(16, 4, 1, 32, 16, 4, 1)
    if dtype == torch.float32:
        tile = 32 if head_dim_p <= 64 else 16
        warps = 8 if head_dim_p >= 64 else 4
        return TileSettings(64 // (2 if head_dim_p > 128 else 1) // 2, warps, 2, tile, tile, warps, 2)
    decode_n = 32 if head_dim_p > 128 else 64
    if head_dim_p <= 64:
        return TileSettings(decode_n, 4, 2, 128, 64, 8, 3)
    if head_dim_p <= 128:
        return TileSettings(decode_n, 4, 2, 64, 64, 4, 3)
    return TileSettings(decode_n, 4, 2, 64, 32, 8, 2)


_CHOSEN: dict[tuple[int, torch.dtype], TileSettings] = {}


def set_tile_settings(head_dim: int, dtype: torch.dtype, tiles: TileSettings | None) -> None:
    """Use `tiles` for this head size and dtype from now on (None: back to the defaults).
    Set them before precompile.warmup, which compiles what the settings then select."""
    key = (next_pow2(max(head_dim, 16)), dtype)
    if tiles is None:
        _CHOSEN.pop(key, None)
    else:
        _CHOSEN[key] = tiles


def tile_settings(head_dim_p: int, dtype: torch.dtype) -> TileSettings:
    return _CHOSEN.get((head_dim_p, dtype)) or default_tiles(head_dim_p, dtype)


def is_decode(group: int, max_seqlen_q: int) -> bool:
    """Whether every sequence's query rows (times the GQA group) fit the smallest M tile."""
    return max_seqlen_q * group <= max(16, next_pow2(group))


def tile_config(head_dim_p: int, group: int, max_seqlen_q: int,
                dtype: torch.dtype = torch.float16) -> dict:
    """BLOCK_M / BLOCK_N / num_warps / num_stages for one launch, from the chosen settings.
    The M tile holds the GQA group's rows of each query token, so it is at least the group."""
    tiles, group_p = tile_settings(head_dim_p, dtype), next_pow2(group)
    if is_decode(group, max_seqlen_q):
        return {"BLOCK_M": max(16, group_p), "BLOCK_N": tiles.decode_block_n,
                "num_warps": tiles.decode_num_warps, "num_stages": tiles.decode_num_stages}
    return {"BLOCK_M": max(tiles.prefill_block_m, group_p), "BLOCK_N": tiles.prefill_block_n,
            "num_warps": tiles.prefill_num_warps, "num_stages": tiles.prefill_num_stages}


def batch_bucket(num_seqs: int) -> int:
    """The batch sizes that share one split count (and one captured graph): powers of two."""
    return next_pow2(max(num_seqs, 1))


def num_kv_splits(num_seqs: int, num_kv_heads: int, num_sms: int) -> int:
    """How many programs share one (sequence, KV head)'s keys in a decode step.

    Splitting pays when num_seqs * num_kv_heads programs leave the GPU short of ~4 per
    multiprocessor. It is a function of the batch-size bucket alone, so it never changes with
    context lengths: a split that finds no key tile stores an empty partial (max -inf), which
    the merge weighs zero, at the price of one small extra launch on short contexts.
    Powers of two only, so few variants compile.
    """
    programs = batch_bucket(num_seqs) * max(num_kv_heads, 1)
    splits = min(-(-4 * num_sms // programs), MAX_SPLITS)
    return 1 if splits < 2 else 1 << (splits.bit_length() - 1)


def decode_split_counts(max_num_seqs: int, num_kv_heads: int, num_sms: int) -> list[int]:
    """Every split count a decode step of up to max_num_seqs sequences can launch, 1 included
    (the benchmark's one-split comparison uses it even where no bucket does)."""
    counts, bucket = {1}, 1
    while bucket <= batch_bucket(max_num_seqs):
        counts.add(num_kv_splits(bucket, num_kv_heads, num_sms))
        bucket *= 2
    return sorted(counts)
