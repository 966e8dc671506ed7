"""Offline throughput: pagedserve's `LLM` against transformers' static batching, side by side.

    python -m pagedserve.bench.throughput [--model DIR] [--num-requests 200] [--out results/throughput.json]

With no --model, the `small` llama preset is built once into .models/bench. transformers is tried
in each dtype and batch size on the whole workload (or on a slice, --tune-requests, and then rerun
in its best configuration on the whole workload); pagedserve runs the same requests. Both produce
exactly the requested tokens. The roofline (bench/roofline.py) is measured in the same run, and
pagedserve's rate of computed tokens (prompt + output) is printed as a share of that GEMM-bound
ceiling.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from pagedserve.bench.hf_baseline import best_static_config, run_hf
from pagedserve.bench.results import write_results
from pagedserve.bench.roofline import machine_description, measure, model_config, resolve_dtype
from pagedserve.bench.workload import BenchRequest, sharegpt_like

ROOT = Path(__file__).resolve().parent.parent


def default_model(preset: str = "small") -> Path:
    from pagedserve.make_model import make_model

    out = ROOT / ".models" / "bench" / f"llama-{preset}"
    if not (out / "pagedserve.json").exists():
        make_model("llama", preset, out, seed=0)
    return out


def warm_up_requests(requests: list[BenchRequest], count: int = 4) -> list[BenchRequest]:
    """A few requests like the workload's first ones but with other prompt ids (reversed), so
    a warm-up leaves nothing in the prefix cache that the measured requests could hit."""
    return [BenchRequest(r.prompt_token_ids[::-1], min(r.output_len, 32))
            for r in requests[:count]]


def run_pagedserve(model_dir: str, requests: list[BenchRequest], args) -> dict:
    from pagedserve import LLM, SamplingParams

    llm = LLM(model_dir, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens,
              kv_cache_memory_bytes=args.kv_cache_memory_bytes, device=args.device,
              model_impl=getattr(args, "model_impl", "auto"),  # bench.serve's args lack it
              kv_cache_dtype=getattr(args, "kv_cache_dtype", "auto"))
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    params = [SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True)
              for r in requests]
    warm = warm_up_requests(requests)  # other prompts: the measured ones find nothing cached
    llm.generate([{"prompt_token_ids": r.prompt_token_ids} for r in warm],
                 [SamplingParams(max_tokens=r.output_len, ignore_eos=True) for r in warm],
                 use_tqdm=False)
    hits_before = llm.scheduler.stats().prefix_cache_hits
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    produced = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert produced == sum(r.output_len for r in requests), "pagedserve produced other lengths"
    prompt_tokens = sum(len(r.prompt_token_ids) for r in requests)
    return {
        "elapsed_s": elapsed, "output_tokens": produced, "prompt_tokens": prompt_tokens,
        "requests_per_s": len(requests) / elapsed, "output_tokens_per_s": produced / elapsed,
        # every prompt token and every output token but the last is computed once (no prefix hits
        # in this workload; preemption would add recompute, counted in num_preemptions)
        "computed_tokens_per_s": (prompt_tokens + produced - len(requests)) / elapsed,
        "num_preemptions": llm.scheduler.num_preemptions,
        "prefix_cache_hit_tokens": llm.scheduler.stats().prefix_cache_hits - hits_before,
        "kv_utilisation_at_peak": llm.kv_usage.utilisation_at_peak,
        "peak_blocks_in_use": llm.kv_usage.peak_blocks_in_use,
        "dtype": str(llm.executor.describe().dtype),
        "kv_cache_dtype": str(llm.executor.kv_dtype).removeprefix("torch."),
        "num_kv_blocks": llm.executor.describe().num_kv_blocks,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="HF-format model dir (default: small llama)")
    p.add_argument("--preset", default="small", help="make-model preset when --model is absent")
    p.add_argument("--num-requests", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="cpu")
    p.add_argument("--model-impl", default="auto", choices=("auto", "native", "transformers"),
                   help="pagedserve's model code, or transformers' on its attention")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    p.add_argument("--kv-cache-dtype", default="auto", help="auto, bfloat16 or fp8")
    p.add_argument("--hf-dtypes", default="bfloat16,float32")
    p.add_argument("--hf-batch-sizes", default="8,16,32,64")
    p.add_argument("--tune-requests", type=int, default=0,
                   help="transformers is tuned on this many requests (0: the whole workload; a "
                        "slice shorter than a few batches misjudges static batching's tail)")
    p.add_argument("--skip-hf", action="store_true", help="only measure pagedserve")
    p.add_argument("--skip-roofline", action="store_true", help="no GEMM ceiling")
    p.add_argument("--out", default=str(ROOT / "results" / "throughput.json"))
    return p.parse_args(argv)


def _hf_side(model_dir: str, requests: list[BenchRequest], args) -> dict:
    """transformers in its best (dtype, batch size). Tuned on the whole workload (tune-requests 0
    or >= the workload), the best trial is the result; on a slice, the best is rerun on all."""
    whole = args.tune_requests <= 0 or args.tune_requests >= len(requests)
    tune = requests if whole else requests[: args.tune_requests]
    dtypes = [d for d in args.hf_dtypes.split(",") if d]
    sizes = [int(b) for b in args.hf_batch_sizes.split(",") if b]
    dtype, batch, trials = best_static_config(model_dir, tune, dtypes, sizes, args.device)
    result = (max(trials, key=lambda t: t.output_tokens_per_s) if whole
              else run_hf(model_dir, requests, dtype, batch, args.device))
    return {
        "dtype": dtype, "batch_size": batch, "elapsed_s": result.elapsed_s,
        "output_tokens": result.output_tokens, "requests_per_s": result.requests_per_s,
        "output_tokens_per_s": result.output_tokens_per_s,
        "tuning": [{"dtype": t.dtype, "batch_size": t.batch_size,
                    "output_tokens_per_s": t.output_tokens_per_s} for t in trials],
    }


def print_table(results: dict) -> None:
    ps, hf = results["pagedserve"], results.get("transformers")
    print(f"\nworkload: {results['num_requests']} requests, {ps['output_tokens']} output tokens")
    print(f"{'engine':<34} {'req/s':>8} {'out tok/s':>10} {'ratio':>7}")
    base = hf["output_tokens_per_s"] if hf else None
    rows = [("pagedserve LLM (" + ps["dtype"] + ")", ps)]
    if hf:
        rows.append((f"transformers static ({hf['dtype']}, bs={hf['batch_size']})", hf))
    for name, r in rows:
        ratio = f"{r['output_tokens_per_s'] / base:.2f}x" if base else "-"
        print(f"{name:<34} {r['requests_per_s']:>8.2f} {r['output_tokens_per_s']:>10.1f} {ratio:>7}")
    if hf:
        trials = ", ".join(f"{t['dtype']} bs={t['batch_size']}: {t['output_tokens_per_s']:.1f}"
                           for t in hf["tuning"])
        print(f"transformers trials (output tok/s): {trials}")
    print(f"KV utilisation at peak: {ps['kv_utilisation_at_peak']:.1%} "
          f"({ps['peak_blocks_in_use']} blocks); preemptions: {ps['num_preemptions']}")
    roof = results.get("roofline")
    if roof:
        ceiling = roof["ceiling_tokens_per_s"]
        print(f"roofline: GEMM-bound ceiling {ceiling:.0f} tokens/s ({roof['dtype']}, "
              f"M={roof['best_m']}); pagedserve computed {ps['computed_tokens_per_s']:.0f} "
              f"tokens/s (prompt + output) = {ps['computed_tokens_per_s'] / ceiling:.1%} of it, "
              f"output alone {ps['output_tokens_per_s'] / ceiling:.1%}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model_dir = args.model or str(default_model(args.preset))
    vocab = model_config(model_dir)["vocab_size"]
    requests = sharegpt_like(args.num_requests, vocab, seed=args.seed)
    results = {
        "model": model_dir, "num_requests": len(requests), "machine": machine_description(),
        "pagedserve": run_pagedserve(model_dir, requests, args),
    }
    write_results(args.out, results)  # kept if a later part is cut off (a GPU window's timeout)
    if not args.skip_roofline:
        config = model_config(model_dir)
        results["roofline"] = measure(config, resolve_dtype(args.dtype, config), [64, 256, 512])
    if not args.skip_hf:
        results["transformers"] = _hf_side(model_dir, requests, args)
        results["ratio"] = (results["pagedserve"]["output_tokens_per_s"]
                            / results["transformers"]["output_tokens_per_s"])
    print_table(results)
    write_results(args.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
