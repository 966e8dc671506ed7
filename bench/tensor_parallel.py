"""Tensor (and pipeline) parallelism's overhead on the CPU: output tokens/s of
LLM(tensor_parallel_size=N, pipeline_parallel_size=M) against N=M=1 on the same requests and the
same machine.

    pagedserve bench tensor-parallel [--model DIR] [--sizes 1,2,1x2] [--num-requests 32]
                                     [--device cpu|cuda[:N]]

With --device cuda each rank takes a GPU of its own (NCCL between them) and the baseline one GPU;
the figures below are about the CPU.

A size is N (tensor-parallel ranks) or NxM (N ranks in each of M pipeline stages).

With no --model, the `small` llama preset (bench/throughput.py's default_model). Each size runs in
a fresh process (rank 0, which starts its ranks), so no run's memory or threads carry into the
next. The ranks split the machine's cores (each gets cores / N threads) and add one all-reduce per
row-parallel layer, one after the embedding, a logits all-gather (over shared memory:
executor/shm_allreduce.py; over gloo with PAGEDSERVE_DISABLE_SHM_ALLREDUCE=1) and a gloo plan
broadcast per step, so on an idle machine TP=N cannot be faster than TP=1. On one shared with other work it can be:
TP=1's single OpenMP team over all cores stalls at every barrier where one of its threads was
preempted, where each rank's one-thread team does not. The issue's target: TP=2 reaches at least
85% of TP=1's output tokens/s on the `small` model. Also reported: each rank's weight bytes and
resident memory (VmRSS: torch's libraries and the KV cache included).

Pipeline stages (executor/pipeline_parallel.py) each take cores / M threads and run their layers
on one micro-batch while the next stage runs the previous one; every micro-batch re-reads the
stage's weights, the hand-offs and the samples' broadcast go over gloo, and the stages wait on each
other at the start and end of every step (the pipeline fills and drains within it), so PP=M
cannot be faster than PP=1 on one machine: the figure is the overhead.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from pagedserve.bench.results import write_results
from pagedserve.bench.throughput import ROOT, default_model, warm_up_requests
from pagedserve.bench.workload import sharegpt_like

TARGET_SHARE = 0.85
RESULT = "tensor-parallel result: "


def _rss_bytes(pid: int) -> int:
    """A process's resident memory (torch's libraries and the KV cache included)."""
    with open(f"/proc/{pid}/status") as f:
        kib = next(line.split()[1] for line in f if line.startswith("VmRSS:"))
    return int(kib) * 1024


def layout(size: str) -> tuple[int, int]:
    """--sizes' entry "N" or "NxM": (tensor_parallel_size, pipeline_parallel_size)."""
    tp, _, pp = size.partition("x")
    return int(tp), int(pp or 1)


def run(model: str, size: str, requests, args) -> dict:
    from pagedserve import LLM, SamplingParams

    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    params = [SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True)
              for r in requests]
    warm = warm_up_requests(requests)
    tp, pp = layout(size)
    with LLM(model, dtype=args.dtype, device=args.device, tensor_parallel_size=tp,
             pipeline_parallel_size=pp,
             max_num_seqs=args.max_num_seqs,
             max_num_batched_tokens=args.max_num_batched_tokens,
             kv_cache_memory_bytes=args.kv_cache_memory_bytes) as llm:
        llm.generate([{"prompt_token_ids": r.prompt_token_ids} for r in warm],
                     [SamplingParams(max_tokens=r.output_len, ignore_eos=True) for r in warm],
                     use_tqdm=False)
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        weights = llm.executor.weight_bytes_per_rank()
        ranks = llm.executor.ranks
        rss = [_rss_bytes(pid) for pid in [os.getpid()] + [p.pid for p in (ranks.procs if ranks else [])]]
        dtype = llm.executor.describe().dtype
    produced = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"tensor_parallel_size": tp, "pipeline_parallel_size": pp, "elapsed_s": elapsed,
            "output_tokens": produced,
            "output_tokens_per_s": produced / elapsed, "weight_bytes_per_rank": weights,
            "rss_bytes_per_rank": rss,
            "dtype": dtype, "token_ids": [o.outputs[0].token_ids for o in outputs]}


def _run_in_child(size: str, argv: list[str]) -> dict:
    """One size in a fresh process, so that no run's memory (the allocator keeps what it
    freed: executor/host_memory.py) or threads carry into the next one's figures."""
    out = subprocess.run([sys.executable, "-m", "pagedserve.bench.tensor_parallel", *argv,
                          "--one", size], check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(next(line for line in out.splitlines()[::-1]
                           if line.startswith(RESULT))[len(RESULT):])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF-format model dir (default: small llama)")
    p.add_argument("--preset", default="small", help="make-model preset when --model is absent")
    p.add_argument("--sizes", default="1,2,1x2",
                   help="tensor-parallel sizes N, or NxM for M pipeline stages of N ranks; the "
                        "first is the baseline")
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--prompt-median", type=float, default=120)
    p.add_argument("--output-median", type=float, default=100)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="cpu",
                   help="cpu, or cuda[:N]: rank r on cuda:(N + r) (executor/rank_devices.py)")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    p.add_argument("--out", default=str(ROOT / "results" / "tensor_parallel.json"))
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child's size
    args = p.parse_args(argv)
    model = args.model or str(default_model(args.preset))
    from pagedserve.executor.model_config import ModelConfig

    vocab = ModelConfig.from_dir(model).vocab_size
    requests = sharegpt_like(args.num_requests, vocab, prompt_median=args.prompt_median,
                             output_median=args.output_median)
    if args.one is not None:  # one size, in this fresh process; the result on the last line
        print(RESULT + json.dumps(run(model, args.one, requests, args)))
        return 0
    runs = [_run_in_child(size, argv if argv is not None else sys.argv[1:])
            for size in args.sizes.split(",")]
    base = runs[0]
    for r in runs:
        r["share_of_baseline"] = r["output_tokens_per_s"] / base["output_tokens_per_s"]
        r["same_tokens_as_baseline"] = r["token_ids"] == base["token_ids"]
        print(f"TP={r['tensor_parallel_size']} PP={r['pipeline_parallel_size']}: "
              f"{r['output_tokens_per_s']:.1f} output tokens/s "
              f"({r['share_of_baseline']:.1%} of TP={base['tensor_parallel_size']} "
              f"PP={base['pipeline_parallel_size']}), "
              f"{r['dtype']}, weights per rank {r['weight_bytes_per_rank']}, resident per rank "
              f"{r['rss_bytes_per_rank']}, same tokens: "
              f"{r['same_tokens_as_baseline']}")
    for r in runs:
        del r["token_ids"]
    write_results(args.out, {"model": model, "num_requests": args.num_requests,
                             "target_share": TARGET_SHARE, "runs": runs})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
