"""bf16 GEMMs on an AVX-512 CPU: oneDNN's packed kernels (`vdpbf16ps`) against panel_gemm512's
paired panels (float32 FMAs on the widened weights), side by side, with the two instructions'
rates on one core that decide between them (kernels/cpu/panel_gemm512.py's `preferred`).

    python -m pagedserve.bench.bf16_gemm [--rows 1,16,64,512] [--rounds 3] [--out PATH]
    pagedserve bench bf16-gemm ...

Shapes: the `small` model's (hidden 768, intermediate 2048, 4000-token head), SmolLM2-135M's
gate_up and LM head, and a 2048 x 5632 layer. Each cell is GFLOP/s, the best of `--rounds`
timings of 0.2 s each, the two kernels alternating; `x` is oneDNN's time over the panels'. The
machine is shared, so only ratios from one run mean much; JSON goes to results/bf16_gemm.json
unless --out says otherwise.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pagedserve.bench.results import write_results
from pagedserve.bench.roofline import machine_description

ROOT = Path(__file__).resolve().parent.parent
SHAPES = (("small qkv", 1280, 768), ("small o", 768, 768), ("small gate_up", 4096, 768),
          ("small down", 768, 2048), ("small lm_head", 4000, 768),
          ("smollm2 gate_up", 3072, 576), ("smollm2 lm_head", 49152, 576),
          ("2048->5632", 5632, 2048))  # (name, out, in)


def _seconds(fn: Callable[[], object], budget: float = 0.2) -> float:
    fn()
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < budget:
        fn()
        calls += 1
    return (time.perf_counter() - start) / calls


def measure(rows: list[int], rounds: int) -> list[dict]:
    from pagedserve.executor.layers.cpu_gemm import PackedWeight, packed_linear
    from pagedserve.kernels.cpu import panel_gemm512

    table = []
    for name, n, k in SHAPES:
        weight = torch.randn(n, k).bfloat16()
        onednn = PackedWeight(torch.ops.mkldnn._reorder_linear_weight(weight), None, n)
        pairs = panel_gemm512.pack(weight)
        for m in rows:
            x = torch.randn(m, k).bfloat16()
            calls = {"onednn": functools.partial(packed_linear, x, onednn, None),
                     "pairs": functools.partial(panel_gemm512.linear, x, pairs, n, None)}
            best = {"onednn": float("inf"), "pairs": float("inf")}
            for _ in range(rounds):
                for kernel, call in calls.items():
                    best[kernel] = min(best[kernel], _seconds(call))
            flop = 2 * m * n * k
            table.append({"shape": name, "rows": m, "onednn_gflops": flop / best["onednn"] / 1e9,
                          "pairs_gflops": flop / best["pairs"] / 1e9,
                          "speedup": best["onednn"] / best["pairs"]})
    return table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", default="1,16,64,512")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "results" / "bf16_gemm.json"))
    args = p.parse_args(argv)
    from pagedserve.kernels.cpu import panel_gemm512

    if not panel_gemm512.available():
        raise SystemExit("panel_gemm512 needs an AVX-512 CPU")
    lib = panel_gemm512._lib()
    fma = max(lib.panel_gemm512_fma_gflops() for _ in range(3))
    dpbf16 = max(lib.panel_gemm512_dpbf16_gflops() for _ in range(3))
    print(f"{machine_description()}\none core: float32 FMA {fma:.0f} GFLOP/s, vdpbf16ps "
          f"{dpbf16:.0f}; the engine uses the panels: {panel_gemm512.preferred()}")
    table = measure([int(r) for r in args.rows.split(",")], args.rounds)
    print(f"\n{'shape':>18} {'rows':>5} {'oneDNN GFLOP/s':>15} {'panels GFLOP/s':>15} {'x':>6}")
    for r in table:
        print(f"{r['shape']:>18} {r['rows']:>5} {r['onednn_gflops']:>15.1f} "
              f"{r['pairs_gflops']:>15.1f} {r['speedup']:>6.2f}")
    results = {"machine": machine_description(), "fma_gflops_one_core": fma,
               "dpbf16_gflops_one_core": dpbf16, "preferred": panel_gemm512.preferred(),
               "table": table}
    write_results(args.out, results)
    return 0


if __name__ == "__main__":
    main()
