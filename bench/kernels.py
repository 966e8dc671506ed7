"""Attention kernel microbenchmarks.

Decode: Llama-1B-like attention (32 query heads, 8 KV heads, head 64, bf16, 16-token pages) at batch
1/32/128 and context 1k/4k/16k, as achieved GB/s (K/V read plus q and out) against this card's own
device-to-device copy bandwidth (bytes read plus written), with and without the split-KV path.
Prefill: causal attention over whole prompts as TFLOP/s against torch SDPA (is_causal, contiguous).
First the start-up warm-up the executor runs (kernels.triton.warmup) compiles the attention
variants; then every timed call is watched for compiles (triton's in-memory kernel caches on a
GPU; under the interpreter, new launch keys: what a GPU would compile). Expect 0.
--sweep instead times candidate tile settings per head size (bench/tile_sweep.py).

    python -m pagedserve.bench.kernels              # on a GPU; JSON to $OUT/bench_kernels.json or results/
    python -m pagedserve.bench.kernels --cpu-smoke  # tiny sizes through the Triton interpreter, as a check
    python -m pagedserve.bench.kernels --sweep --sweep-budget-s 240  # JSON: bench_sweep.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GPU_SHAPES = {"decode_batches": (1, 32, 128), "decode_contexts": (1024, 4096, 16384),
              "prefill": ((1, 1024), (1, 4096), (1, 8192), (4, 1024), (4, 4096), (4, 8192)),
              "heads": (32, 8, 64), "block_size": 16, "dtype": "bfloat16"}
CPU_SHAPES = {"decode_batches": (1, 2), "decode_contexts": (40, 600),
              "prefill": ((1, 32), (2, 48)),
              "heads": (4, 2, 32), "block_size": 16, "dtype": "float16"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes under TRITON_INTERPRET")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default $OUT or results/)")
    p.add_argument("--sweep", action="store_true",
                   help="time candidate tile settings per head size; print the best")
    p.add_argument("--sweep-heads", default=None,
                   help="comma-separated head sizes to sweep (default 64,128)")
    p.add_argument("--sweep-budget-s", type=float, default=None,
                   help="stop timing new candidates after this many seconds (partial results kept)")
    return p.parse_args(argv)


def timer(cuda: bool):
    """fn -> median seconds per call. On a GPU: triton's do_bench (CUDA events, L2 flushed)."""
    if cuda:
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3

    def cpu_time(fn):
        fn()
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return cpu_time


def copy_bandwidth(torch, device, cuda: bool, measure) -> float:
    """Bytes read plus written per second by a large device-to-device tensor copy."""
    n = (1 << 30) if cuda else (1 << 24)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * n / measure(lambda: dst.copy_(src))


def paged_context(torch, batch: int, ctx: int, shapes: dict, device):
    """K/V caches holding `batch` contexts of `ctx` tokens in shuffled pages, and their tables."""
    _, kv_heads, head_dim = shapes["heads"]
    block_size, dtype = shapes["block_size"], getattr(torch, shapes["dtype"])
    per_seq = -(-ctx // block_size)
    shape = (batch * per_seq, block_size, kv_heads, head_dim)
    k_cache = torch.randn(shape, dtype=dtype, device=device)
    v_cache = torch.randn(shape, dtype=dtype, device=device)
    tables = torch.randperm(batch * per_seq, device=device).view(batch, per_seq).int()
    return k_cache, v_cache, tables


def rel_err_vs_reference(torch, args: tuple, kw: dict, max_q: int, max_k: int) -> float:
    """||out - ref|| / ||ref|| for the output the Triton kernel left in args[-1]."""
    from pagedserve.kernels import reference

    ref = reference.paged_attention(*args[:-1], torch.empty_like(args[-1]), **kw,
                                    max_seqlen_q=max_q, max_seqlen_k=max_k)
    err = ((args[-1].float() - ref.float()).norm() / ref.float().norm()).item()
    assert err < 3e-2, f"attention output differs from the reference: {err:.2e}"
    return err


class CountingTimer:
    """measure(fn), also counting the kernel variants compiled while it runs."""

    def __init__(self, measure, counter) -> None:
        self.measure, self.counter, self.compiles = measure, counter, 0

    def __call__(self, fn) -> float:
        before = self.counter.count()
        seconds = self.measure(fn)
        self.compiles += self.counter.count() - before
        return seconds


def warm_kernels(torch, shapes: dict, device, counter) -> dict:
    """The executor's start-up warm-up, timed. On a GPU the binaries it built are checked
    against the launch keys predicted the way the CPU tests predict them."""
    from pagedserve.kernels.triton import warmup
    from pagedserve.kernels.triton.variants import record_launch_keys

    q_heads, kv_heads, head_dim = shapes["heads"]
    cache = torch.zeros(4, shapes["block_size"], kv_heads, head_dim,
                        dtype=getattr(torch, shapes["dtype"]), device=device)
    max_seqs = max(*shapes["decode_batches"], *(b for b, _ in shapes["prefill"]))
    before, t0 = counter.count(), time.perf_counter()
    with record_launch_keys() as keys:
        n = warmup(cache, cache, num_q_heads=q_heads, max_num_seqs=max_seqs)
    return {"variants": n, "seconds": time.perf_counter() - t0,
            "compiled": counter.count() - before, "predicted": len(keys)}


def bench_decode(torch, shapes: dict, device, measure) -> list[dict]:
    from pagedserve.kernels.triton.attention import launch_plan
    from pagedserve.kernels.triton.attention import paged_attention as attn
    from pagedserve.kernels.triton.attention import paged_attention_launch as launch

    q_heads, kv_heads, head_dim = shapes["heads"]
    dtype = getattr(torch, shapes["dtype"])
    rows = []
    for ctx in shapes["decode_contexts"]:
        for batch in shapes["decode_batches"]:
            k_cache, v_cache, tables = paged_context(torch, batch, ctx, shapes, device)
            q = torch.randn(batch, q_heads, head_dim, dtype=dtype, device=device)
            out = torch.empty_like(q)
            cu = torch.arange(batch + 1, dtype=torch.int32, device=device)
            lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
            args = (q, k_cache, v_cache, cu, lens, tables, out)
            kw = {"scale": head_dim**-0.5}
            cfg, splits = launch_plan(batch, q_heads, kv_heads, head_dim, dtype, 1, device)
            t = measure(partial(attn, *args, max_seqlen_q=1, max_seqlen_k=ctx, **kw))
            t1 = measure(partial(launch, *args, sliding_window=0, softcap=0.0, num_splits=1,
                                 **cfg, **kw))
            nbytes = 2 * k_cache[0].numel() * k_cache.element_size() * tables.numel()
            nbytes += 2 * q.numel() * q.element_size()
            rows.append({"batch": batch, "context": ctx, "splits": splits, "us": t * 1e6,
                         "GBps": nbytes / t / 1e9, "us_no_split": t1 * 1e6,
                         "GBps_no_split": nbytes / t1 / 1e9})
            if len(rows) == 1:  # the smallest shape: check the output against the reference
                attn(*args, max_seqlen_q=1, max_seqlen_k=ctx, **kw)
                rows[0]["rel_err"] = rel_err_vs_reference(torch, args, kw, 1, ctx)
            del k_cache, v_cache
    return rows


def bench_prefill(torch, shapes: dict, device, measure) -> list[dict]:
    import torch.nn.functional as F

    from pagedserve.kernels.triton.attention import paged_attention

    q_heads, _, head_dim = shapes["heads"]
    dtype = getattr(torch, shapes["dtype"])
    rows = []
    for batch, seq in shapes["prefill"]:
        k_cache, v_cache, tables = paged_context(torch, batch, seq, shapes, device)
        q = torch.randn(batch * seq, q_heads, head_dim, dtype=dtype, device=device)
        out = torch.empty_like(q)
        cu = torch.arange(batch + 1, dtype=torch.int32, device=device) * seq
        lens = torch.full((batch,), seq, dtype=torch.int32, device=device)
        t = measure(partial(paged_attention, q, k_cache, v_cache, cu, lens, tables, out,
                            scale=head_dim**-0.5, max_seqlen_q=seq, max_seqlen_k=seq))
        q4 = q.view(batch, seq, q_heads, head_dim).transpose(1, 2).contiguous()
        k4 = torch.randn(batch, q_heads, seq, head_dim, dtype=dtype, device=device)
        v4 = torch.randn_like(k4)
        t_sdpa = measure(partial(F.scaled_dot_product_attention, q4, k4, v4, is_causal=True))
        flops = 2 * batch * q_heads * seq * seq * head_dim  # QK^T and PV, causal half
        rows.append({"batch": batch, "seq": seq, "us": t * 1e6, "TFLOPs": flops / t / 1e12,
                     "sdpa_us": t_sdpa * 1e6, "sdpa_TFLOPs": flops / t_sdpa / 1e12})
        if len(rows) == 1:
            args = (q, k_cache, v_cache, cu, lens, tables, out)
            rows[0]["rel_err"] = rel_err_vs_reference(torch, args, {"scale": head_dim**-0.5},
                                                      seq, seq)
        del k_cache, v_cache, k4, v4
    return rows


def print_tables(result: dict) -> None:
    copy = result["copy_GBps"]
    print(f"device: {result['device']}   copy bandwidth (read+write): {copy:.0f} GB/s")
    w = result["warmup"]
    print(f"kernel variants: warm-up built {w['compiled']} (launch keys predicted "
          f"{w['predicted']}) in {w['seconds']:.1f} s; compiled during timed runs: "
          f"{result['compiles_timed']} (decode {result['compiles_decode']})")
    print(f"error vs reference, smallest shapes: decode {result['decode'][0]['rel_err']:.1e}, "
          f"prefill {result['prefill'][0]['rel_err']:.1e}")
    print("decode attention (K/V + q/out bytes)")
    print(f"{'batch':>6} {'ctx':>6} {'splits':>6} {'us':>9} {'GB/s':>8} {'%copy':>6} "
          f"{'us 1-split':>10} {'GB/s':>8}")
    for r in result["decode"]:
        print(f"{r['batch']:>6} {r['context']:>6} {r['splits']:>6} {r['us']:>9.1f} "
              f"{r['GBps']:>8.0f} {100 * r['GBps'] / copy:>5.0f}% {r['us_no_split']:>10.1f} "
              f"{r['GBps_no_split']:>8.0f}")
    print("prefill attention (causal), ours vs torch SDPA")
    print(f"{'batch':>6} {'seq':>6} {'us':>9} {'TFLOP/s':>8} {'sdpa us':>9} {'TFLOP/s':>8} "
          f"{'ratio':>6}")
    for r in result["prefill"]:
        print(f"{r['batch']:>6} {r['seq']:>6} {r['us']:>9.1f} {r['TFLOPs']:>8.1f} "
              f"{r['sdpa_us']:>9.1f} {r['sdpa_TFLOPs']:>8.1f} {r['TFLOPs'] / r['sdpa_TFLOPs']:>6.2f}")


def run_benchmarks(torch, cuda: bool, device, measure) -> dict:
    from pagedserve.kernels.triton.variants import VariantCounter

    shapes = GPU_SHAPES if cuda else CPU_SHAPES
    result = {"device": torch.cuda.get_device_name(device) if cuda else "cpu (interpreter)",
              "shapes": shapes, "copy_GBps": copy_bandwidth(torch, device, cuda, measure) / 1e9}
    with VariantCounter() as counter:
        result["warmup"] = warm_kernels(torch, shapes, device, counter)
        timed = CountingTimer(measure, counter)
        result["decode"] = bench_decode(torch, shapes, device, timed)
        result["compiles_decode"] = timed.compiles
        result["prefill"] = bench_prefill(torch, shapes, device, timed)
        result["compiles_timed"] = timed.compiles
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported
    sys.path.insert(0, str(ROOT))
    import torch

    from pagedserve.bench.results import write_results

    cuda = torch.cuda.is_available() and not args.cpu_smoke
    if not cuda and not args.cpu_smoke:
        print("no CUDA device: run with --cpu-smoke for the interpreter check", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    name = "bench_sweep.json" if args.sweep else "bench_kernels.json"
    out = args.out or Path(os.environ.get("OUT") or ROOT / "results") / name
    if args.sweep:
        from pagedserve.bench.tile_sweep import run_sweep

        heads = [int(h) for h in args.sweep_heads.split(",")] if args.sweep_heads else None
        run_sweep(torch, cuda, device, timer(cuda), heads, args.sweep_budget_s, out)
        return 0
    result = run_benchmarks(torch, cuda, device, timer(cuda))
    print_tables(result)
    write_results(out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
