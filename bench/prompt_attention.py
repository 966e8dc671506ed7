"""Prompt attention on the CPU: every row in C (kernels/cpu, what runs now) against the reference's
gather and torch's fused attention (what prompt chunks ran through before), side by side.

    python -m pagedserve.bench.prompt_attention [--lens 128,512,2048] [--rounds 9]

One sequence's prompt of each length is attended in one call (one layer), the two paths taking
turns round after round; the table gives each path's median time and their ratio. Head shapes:
SmolLM2-135M's (9 query heads, 3 KV heads, 64) and an 8B model's (32, 8, 128), bf16 and float32.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pagedserve.bench.results import write_results
from pagedserve.bench.roofline import machine_description
from pagedserve.bench.throughput import ROOT

SHAPES = {"smollm2": (9, 3, 64), "8b": (32, 8, 128)}
BLOCK_SIZE = 16


def _prompt(length: int, heads: tuple[int, int, int], dtype: torch.dtype) -> tuple:
    """paged_attention's arguments for one prompt of `length` tokens over shuffled pages."""
    hq, hk, d = heads
    blocks = -(-length // BLOCK_SIZE)
    cache = torch.randn(blocks, BLOCK_SIZE, hk, d).to(dtype), torch.randn(blocks, BLOCK_SIZE, hk, d).to(dtype)
    table = torch.randperm(blocks, dtype=torch.int32)[None]
    q = torch.randn(length, hq, d).to(dtype)
    index = (torch.tensor([0, length], dtype=torch.int32), torch.tensor([length], dtype=torch.int32),
             table)
    return q, *cache, *index


def _seconds(attention, args: tuple) -> float:
    q = args[0]
    out = torch.empty_like(q)
    start = time.perf_counter()
    attention(*args, out, scale=q.shape[2] ** -0.5, max_seqlen_q=q.shape[0],
              max_seqlen_k=q.shape[0])
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    from pagedserve.kernels import cpu, reference

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--lens", default="128,512,2048")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--out", default=str(ROOT / "results" / "prompt_attention.json"))
    args = p.parse_args(argv)
    rows = []
    print(f"{'heads':<8} {'dtype':<9} {'tokens':>6} {'C rows ms':>10} {'reference ms':>13} {'C / ref':>8}")
    for name, heads in SHAPES.items():
        for dtype in (torch.bfloat16, torch.float32):
            for length in map(int, args.lens.split(",")):
                prompt = _prompt(length, heads, dtype)
                times = {"c": [], "reference": []}
                for _ in range(args.rounds + 1):  # the first round warms up, not counted
                    for path, module in (("c", cpu), ("reference", reference)):
                        times[path].append(_seconds(module.paged_attention, prompt))
                c, ref = (statistics.median(times[k][1:]) for k in ("c", "reference"))
                rows.append({"heads": name, "dtype": str(dtype)[6:], "tokens": length,
                             "c_ms": c * 1e3, "reference_ms": ref * 1e3, "ratio": c / ref})
                print(f"{name:<8} {rows[-1]['dtype']:<9} {length:>6} {c * 1e3:>10.2f} "
                      f"{ref * 1e3:>13.2f} {c / ref:>7.2f}x", flush=True)
    write_results(args.out, {"machine": machine_description(), "threads": torch.get_num_threads(),
                             "rounds": args.rounds, "cases": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
