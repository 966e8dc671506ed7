"""--kv-cache-dtype side by side: the KV pool's tokens at one budget, and offline throughput when
the pool is what limits the batch.

    python -m pagedserve.bench.kv_cache_dtype [--model DIR] [--budget-mib 48] [--num-requests 48]

Part 1 builds an engine per cache dtype (auto, bfloat16, fp8) at the same byte budget and reports
the blocks and tokens its executor describes (what the scheduler is given). Part 2 runs the same
ShareGPT-like requests through bench/throughput.py's measurement, with each cache dtype in turn
(repeated `--rounds` times, interleaved, so machine noise falls on all alike); the budget is
small enough that the auto cache cannot hold the whole batch (memory-bound: fewer sequences
run at once, or preemptions), so a narrower cache lets more run together.
"""

from __future__ import annotations

import argparse
import statistics

from pagedserve.bench.results import write_results
from pagedserve.bench.roofline import machine_description, model_config
from pagedserve.bench.throughput import ROOT, default_model, run_pagedserve
from pagedserve.bench.workload import sharegpt_like

DTYPES = ("auto", "bfloat16", "fp8")


def pool_sizes(model_dir: str, dtype: str, budget: int) -> list[dict]:
    from pagedserve import LLM

    rows = []
    for kv in DTYPES:
        llm = LLM(model_dir, dtype=dtype, kv_cache_dtype=kv, kv_cache_memory_bytes=budget)
        desc = llm.executor.describe()
        rows.append({"kv_cache_dtype": kv, "stored_as": str(llm.executor.kv_dtype)[6:],
                     "num_kv_blocks": desc.num_kv_blocks,
                     "tokens": desc.num_kv_blocks * desc.block_size})
        del llm
    return rows


def throughput(model_dir: str, args) -> dict[str, list[dict]]:
    vocab = model_config(model_dir)["vocab_size"]
    requests = sharegpt_like(args.num_requests, vocab, seed=args.seed,
                             prompt_median=args.prompt_median, output_median=args.output_median)
    runs: dict[str, list[dict]] = {kv: [] for kv in args.compare.split(",")}
    for _ in range(args.rounds):
        for kv in runs:
            ns = argparse.Namespace(dtype=args.dtype, max_num_seqs=args.max_num_seqs,
                                    max_num_batched_tokens=args.max_num_batched_tokens,
                                    kv_cache_memory_bytes=args.budget_mib << 20,
                                    device="cpu", kv_cache_dtype=kv)
            runs[kv].append(run_pagedserve(model_dir, requests, ns))
            print(kv, f"{runs[kv][-1]['output_tokens_per_s']:.1f} out tok/s", flush=True)
    return runs


def print_tables(pools: list[dict], runs: dict[str, list[dict]], budget_mib: int) -> None:
    print(f"\nKV pool at {budget_mib} MiB:")
    print(f"{'kv-cache-dtype':<16} {'stored as':<14} {'blocks':>7} {'tokens':>8} {'x auto':>7}")
    for r in pools:
        print(f"{r['kv_cache_dtype']:<16} {r['stored_as']:<14} {r['num_kv_blocks']:>7} "
              f"{r['tokens']:>8} {r['tokens'] / pools[0]['tokens']:>6.2f}x")
    first = next(iter(runs.values()))
    print(f"\nthroughput at {budget_mib} MiB ({len(first)} interleaved rounds; ratio: the median "
          "of each round's ratio to the first dtype, so a busy spell falls on both sides):")
    print(f"{'kv-cache-dtype':<16} {'out tok/s (each round)':<28} {'ratio':>7} {'peak blocks':>12} "
          f"{'preemptions':>12}")
    for kv, rs in runs.items():
        each = " ".join(f"{r['output_tokens_per_s']:.1f}" for r in rs)
        ratio = statistics.median(r["output_tokens_per_s"] / b["output_tokens_per_s"]
                                  for r, b in zip(rs, first))
        print(f"{kv:<16} {each:<28} {ratio:>6.2f}x {max(r['peak_blocks_in_use'] for r in rs):>12} "
              f"{max(r['num_preemptions'] for r in rs):>12}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="HF-format model dir (default: small llama)")
    p.add_argument("--dtype", default="auto", help="the engine's compute dtype")
    p.add_argument("--budget-mib", type=int, default=48)
    p.add_argument("--compare", default="auto,fp8", help="cache dtypes for the throughput runs")
    p.add_argument("--num-requests", type=int, default=48)
    p.add_argument("--prompt-median", type=float, default=300)
    p.add_argument("--output-median", type=float, default=64)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "results" / "kv_cache_dtype.json"))
    args = p.parse_args(argv)
    model_dir = args.model or str(default_model())
    pools = pool_sizes(model_dir, args.dtype, args.budget_mib << 20)
    runs = throughput(model_dir, args)
    print_tables(pools, runs, args.budget_mib)
    write_results(args.out, {"model": model_dir, "machine": machine_description(),
                             "budget_mib": args.budget_mib, "pools": pools, "throughput": runs})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
