"""The CPU decode attention kernel (kernels/cpu/paged_decode.c) streaming K/V from DRAM.

    python -m pagedserve.bench.cpu_decode_attention [--layers 12] [--shapes 100x172,64x256,8x1024,1x2048]
    pagedserve bench cpu-decode-attention ...

A decode step reads every running sequence's K and V once per layer, at pages scattered over the
pool. Here each of --layers layers has its own cache (the executor's allocation: zeroed, on huge
pages), large enough together that a step's reads come from DRAM rather than L3; each sequence's
block table is a random draw of the pool's pages. One timed call runs every layer once, as a
decode step does. The table gives milliseconds per step and the K/V bytes read per second, the
figure to hold against the machine's copy bandwidth (`--copy`: a torch copy of the same total
size, reads plus writes). Shapes are BATCHxCONTEXT; the heads default to the `small` llama's.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch

from pagedserve.bench.results import write_results
from pagedserve.bench.roofline import machine_description
from pagedserve.executor.host_memory import zeros_on_huge_pages
from pagedserve.kernels.cpu.attention import paged_attention

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--shapes", default="100x172,64x256,8x1024,1x2048")
    p.add_argument("--heads", default=(12, 4, 64), type=lambda v: tuple(map(int, v.split(","))),
                   help="query heads, KV heads, head_dim (default 12,4,64)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--rounds", type=int, default=5, help="timings per shape; the best is kept")
    p.add_argument("--out", default=str(ROOT / "results" / "cpu_decode_attention.json"))
    return p.parse_args(argv)


def _pool(args: argparse.Namespace, shapes: list[tuple[int, int]]) -> tuple[list, int]:
    """Per layer a K and a V cache with room for the largest shape's pages (at least 64 MiB of
    K/V over all layers, so a step's reads cannot stay in L3)."""
    _, hk, d = args.heads
    dtype = getattr(torch, args.dtype)
    page_bytes = args.block_size * hk * d * dtype.itemsize
    need = max(b * -(-c // args.block_size) for b, c in shapes)
    blocks = max(need, (64 << 20) // (2 * args.layers * page_bytes))
    shape = (blocks, args.block_size, hk, d)
    caches = [tuple(zeros_on_huge_pages(shape, dtype).normal_() for _ in "kv")
              for _ in range(args.layers)]
    return caches, blocks


def _time_shape(args, caches, blocks: int, batch: int, ctx: int) -> dict:
    h, hk, d = args.heads
    dtype = getattr(torch, args.dtype)
    per = -(-ctx // args.block_size)
    pages = random.sample(range(blocks), batch * per)
    tables = torch.tensor(pages, dtype=torch.int32).view(batch, per)
    q = torch.randn(batch, h, d, dtype=dtype)
    out = torch.empty_like(q)
    cu = torch.arange(batch + 1, dtype=torch.int32)
    lens = torch.full((batch,), ctx, dtype=torch.int32)

    def step() -> None:
        for k, v in caches:
            paged_attention(q, k, v, cu, lens, tables, out, scale=d ** -0.5, max_seqlen_q=1,
                            max_seqlen_k=ctx)
    for _ in range(3):  # the first calls after the pool's allocation run slow (page faults)
        step()
    best = float("inf")
    for _ in range(args.rounds):
        start = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - start)
    kv_bytes = 2 * len(caches) * batch * ctx * hk * d * dtype.itemsize
    return {"batch": batch, "context": ctx, "ms_per_step": best * 1e3,
            "kv_gb_per_s": kv_bytes / best / 1e9}


def _copy_gb_per_s(nbytes: int) -> float:
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best / 1e9


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    random.seed(0)
    torch.manual_seed(0)
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
    caches, blocks = _pool(args, shapes)
    rows = [_time_shape(args, caches, blocks, b, c) for b, c in shapes]
    pool_bytes = sum(k.numel() * k.element_size() * 2 for k, _ in caches)
    copy = _copy_gb_per_s(pool_bytes)
    print(f"{machine_description()}; {args.layers} layers, "
          f"heads {','.join(map(str, args.heads))}, {args.dtype}, pool {pool_bytes / 2**20:.0f} MiB")
    print(f"{'batch':>6} {'context':>8} {'ms/step':>9} {'K/V GB/s':>9}")
    for r in rows:
        print(f"{r['batch']:>6} {r['context']:>8} {r['ms_per_step']:>9.3f} {r['kv_gb_per_s']:>9.1f}")
    print(f"torch copy of {pool_bytes / 2**20:.0f} MiB: {copy:.1f} GB/s (read + write)")
    write_results(args.out, {"machine": machine_description(), "args": vars(args), "rows": rows,
                             "copy_gb_per_s": copy})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
