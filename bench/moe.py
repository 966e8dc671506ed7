"""fused_experts on the CPU: the reference twin (one token at a time) against the grouped path,
with plain expert weights (kernels.cpu.fused_experts) and with each expert packed for the CPU
GEMM (the layer's path, executor/layers/fused_moe.py), at decode and prefill row counts.

    python -m pagedserve.bench.moe [--dtype bfloat16] [--experts 4] [--top-k 2]
                                   [--hidden 768] [--intermediate 2048] [--out results/moe.json]

The default widths are the Mixtral-shaped `small` preset's (make-model --arch mixtral). Each
figure is the median of repeated calls; the machine is shared, so read the columns side by side.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pagedserve.bench.results import write_results
from pagedserve.bench.roofline import machine_description

ROOT = Path(__file__).resolve().parent.parent
ROWS = (1, 4, 16, 64, 256, 512)  # tokens in the step: decode batches, then prompt chunks


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--rows", default=",".join(map(str, ROWS)))
    p.add_argument("--min-seconds", type=float, default=1.0, help="timing per cell")
    p.add_argument("--out", default=str(ROOT / "results" / "moe.json"))
    return p.parse_args(argv)


def median_ms(fn: Callable[..., object], inputs: tuple, min_seconds: float) -> float:
    """Median milliseconds of fn(*inputs)."""
    fn(*inputs)  # warm: oneDNN primitives, first-touch allocations
    times: list[float] = []
    deadline = time.perf_counter() + min_seconds
    while len(times) < 3 or time.perf_counter() < deadline:
        start = time.perf_counter()
        fn(*inputs)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _layer(w13: torch.Tensor, w2: torch.Tensor):
    """The executor's layer over these weights, packed for the CPU (None where it cannot pack)."""
    from pagedserve.executor.layers.fused_moe import FusedMoE
    from pagedserve.kernels import cpu

    layer = FusedMoE(w13.shape[0], w13.shape[2], w2.shape[2], cpu).to(w13.dtype)
    layer.w13_weight.data.copy_(w13)
    layer.w2_weight.data.copy_(w2)
    return layer if layer.pack_for_cpu() else None


def run(args: argparse.Namespace) -> dict:
    from pagedserve.kernels import cpu, reference

    dtype = getattr(torch, args.dtype)
    e, h, i, k = args.experts, args.hidden, args.intermediate, args.top_k
    w13 = (torch.randn(e, 2 * i, h) / h**0.5).to(dtype)
    w2 = (torch.randn(e, h, i) / i**0.5).to(dtype)
    layer = _layer(w13, w2)
    rows = []
    for tokens in map(int, args.rows.split(",")):
        x = torch.randn(tokens, h).to(dtype)
        weights, ids = torch.rand(tokens, e).softmax(-1).topk(k, dim=-1)
        inputs = (x, w13, w2, weights, ids)
        cells = {"reference_ms": median_ms(reference.fused_experts, inputs, args.min_seconds),
                 "grouped_ms": median_ms(cpu.fused_experts, inputs, args.min_seconds)}
        if layer is not None:
            cells["grouped_packed_ms"] = median_ms(layer, (x, weights, ids), args.min_seconds)
        rows.append({"tokens": tokens, **cells})
    return {"machine": machine_description(), "dtype": args.dtype, "experts": e, "top_k": k,
            "hidden": h, "intermediate": i, "rows": rows}


def print_table(results: dict) -> None:
    print(f"fused_experts, {results['dtype']}, {results['experts']} experts top-"
          f"{results['top_k']}, hidden {results['hidden']}, intermediate "
          f"{results['intermediate']} ({results['machine']})")
    print(f"{'tokens':>6} {'reference ms':>13} {'grouped ms':>11} {'packed ms':>10} "
          f"{'grouped x':>10} {'packed x':>9}")
    for r in results["rows"]:
        packed = r.get("grouped_packed_ms")
        print(f"{r['tokens']:>6} {r['reference_ms']:>13.2f} {r['grouped_ms']:>11.2f} "
              f"{packed or float('nan'):>10.2f} {r['reference_ms'] / r['grouped_ms']:>9.1f}x "
              f"{r['reference_ms'] / packed if packed else float('nan'):>8.1f}x")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with torch.inference_mode():
        results = run(args)
    print_table(results)
    write_results(args.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
