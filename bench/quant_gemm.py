"""Weight-only int8 / int4 GEMMs on the CPU (kernels/cpu/quant_gemm.c) against the bf16 GEMM the
engine runs today (executor/layers/cpu_gemm.pack_weight: oneDNN with pre-packed weights, or
panel_gemm512's paired panels where its probe prefers them), side by side.

    python -m pagedserve.bench.quant_gemm [--rows 1,16,64,512] [--repeats 5] [--threads N]
                                          [--avx2] [--shapes NAMES] [--act float,int8,int8x2]
                                          [--out PATH]
    pagedserve bench quant-gemm ...

Shapes: SmolLM2-135M's (hidden 576, intermediate 1536, 49152-token LM head) and a 2048 x 5632
layer of a 'small' model. Each format cycles through enough copies of its weight to stream
96 MiB per pass, more than the last-level cache holds, as a forward pass through a whole model
does; a cell is the median time of a multiply over all calls of `--repeats` passes. GB/s counts
the weight's bytes (codes, scales and offsets) over that time; `x bf16` is the bf16 time over the
format's. --act picks the quantized GEMM's activation paths (kernels/cpu/quant_linear.py's ACT):
float x (quant_gemm), int8 x in one pass (quant_gemm_x8, the columns marked x8) and in two
(quant_gemm_x8x2, marked x8x2), each format through all three by default. --avx2 runs what an AVX2-only CPU would: float32 x, the AVX2 builds, against
panel_gemm's bf16 panels. The machine is shared, so only ratios measured in the same run mean
much; JSON goes to results/quant_gemm.json unless --out says otherwise.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pagedserve.bench.results import write_results
from pagedserve.bench.roofline import machine_description

ROOT = Path(__file__).resolve().parent.parent
SHAPES = (("smollm2 qkv", 960, 576), ("smollm2 o", 576, 576), ("smollm2 gate_up", 3072, 576),
          ("smollm2 down", 576, 1536), ("smollm2 lm_head", 49152, 576),
          ("small 2048->5632", 5632, 2048))  # (name, out, in)
# (name, bits, group, symmetric, float16 scales): GGUF's Q8_0 and Q4_1 (float16 scales and
# offsets), and an AWQ-like int4 with float32 offsets (zero point times scale); g128 becomes g64
# where the inputs (576) do not divide by 128
FORMATS = (("int8 g32", 8, 32, True, True), ("int4 g32", 4, 32, False, True),
           ("int4 g128", 4, 128, False, False))
ACTS = {"float": "", "int8": " x8", "int8x2": " x8x2"}  # activation path -> its columns' suffix
STREAM_BYTES = 96 << 20
MAX_MACS_PER_PASS = 4e8  # compute-bound cells need no copies beyond this much work per pass


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="1,16,64,512", help="rows of x (tokens in the step)")
    p.add_argument("--shapes", default=None, help="comma-separated shape names (default all)")
    p.add_argument("--repeats", type=int, default=5, help="timed passes per cell (median)")
    p.add_argument("--threads", type=int, default=None, help="torch (and OpenMP) threads")
    p.add_argument("--act", default=",".join(ACTS),
                   help="activation paths of the quantized GEMM, comma-separated: "
                        + ", ".join(ACTS))
    p.add_argument("--avx2", action="store_true",
                   help="the AVX2 builds (-mno-avx512f) with float32 x, against panel_gemm's "
                        "bf16 panels: what an AVX2-only CPU runs")
    p.add_argument("--out", default=str(ROOT / "results" / "quant_gemm.json"))
    return p.parse_args(argv)


def call_seconds(fn: Callable[..., object], x: torch.Tensor, weights: list,
                 repeats: int) -> tuple[float, float]:
    """(median, best) seconds of fn(x, weight, None) over `repeats` passes through every weight,
    each call timed alone: on a shared machine a call the OS preempts is an outlier the median
    ignores, where a pass's mean would carry it."""
    for w in weights:  # warm: oneDNN primitives, first-touch pages, the C library's build
        fn(x, w, None)
    times = []
    for _ in range(repeats):
        for w in weights:
            start = time.perf_counter()
            fn(x, w, None)
            times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def quantized(w: torch.Tensor, bits: int, group: int, symmetric: bool, half: bool):
    """Round-to-nearest codes; with `half`, scales and offsets rounded to float16 first (the
    codes then chosen for them), as a GGUF file stores them."""
    from pagedserve.kernels.quantized import QuantizedWeight, quantize_rtn

    weight = quantize_rtn(w, bits, group, symmetric)
    if not half:
        return weight
    scale = weight.scale.half().float()
    offset = None if weight.offset is None else weight.offset.half().float()
    lo, hi = (0, 15) if bits == 4 else (-128, 127)
    base = 0 if offset is None else offset.repeat_interleave(group, dim=1)
    q = ((w - base) / scale.repeat_interleave(group, dim=1)).round().clamp(lo, hi)
    return QuantizedWeight(q.to(weight.q.dtype), scale, offset, group, bits)


def fitting_group(group: int, in_features: int) -> int:
    """group, halved until it divides the inputs (576 takes 64 where 128 was asked)."""
    while in_features % group:
        group //= 2
    return group


def copies_for(nbytes: int, macs: int) -> int:
    return max(1, min(-(-STREAM_BYTES // nbytes), int(MAX_MACS_PER_PASS // macs) or 1))


def packed_copies(packed, n: int) -> list:
    """n independent copies of a packed quantized weight (distinct memory, same values)."""
    cls = type(packed)
    return [packed] + [cls(**{name: v.clone() if isinstance(v, torch.Tensor) else v
                              for name, v in vars(packed).items()}) for _ in range(n - 1)]


def weight_bytes(packed) -> int:
    return sum(v.numel() * v.element_size() for v in vars(packed).values()
               if isinstance(v, torch.Tensor))


def bench_shape(name: str, out_f: int, in_f: int, rows: list[int], repeats: int,
                x_dtype: torch.dtype, acts: list[str]) -> list[dict]:
    from pagedserve.executor.layers.cpu_gemm import pack_weight, packed_linear
    ql = importlib.import_module("pagedserve.kernels.cpu.quant_linear")
    w = torch.randn(out_f, in_f) / in_f**0.5
    dense = w.bfloat16() if x_dtype == torch.bfloat16 else w.bfloat16().float()  # bf16 values
    bf16 = pack_weight(dense)
    quant = {f: ql.pack_quantized(quantized(w, bits, fitting_group(g, in_f), sym, half))
             for f, bits, g, sym, half in FORMATS}
    results = []
    for m in rows:
        x = torch.randn(m, in_f).to(x_dtype)
        macs = m * out_f * in_f
        copies = [bf16] + [pack_weight(dense.clone()) for _ in
                           range(copies_for(in_f * out_f * 2, macs) - 1)]
        t_bf16, best = call_seconds(packed_linear, x, copies, repeats)
        row = {"shape": name, "out": out_f, "in": in_f, "rows": m, "bf16_us": t_bf16 * 1e6,
               "bf16_best_us": best * 1e6,
               "bf16_GBps": in_f * out_f * 2 / t_bf16 / 1e9}
        del copies
        for f, packed in quant.items():
            nbytes = weight_bytes(packed)
            ws = packed_copies(packed, copies_for(nbytes, macs))
            for act in acts:
                ql.ACT, col = act, f + ACTS[act]
                t, best = call_seconds(ql.quant_linear, x, ws, repeats)
                row.update({f"{col}_us": t * 1e6, f"{col}_best_us": best * 1e6,
                            f"{col}_GBps": nbytes / t / 1e9, f"{col}_x_bf16": t_bf16 / t})
        results.append(row)
        print(format_row(row, columns(acts)), flush=True)
    return results


def columns(acts: list[str]) -> list[str]:
    return [f + ACTS[act] for f, *_ in FORMATS for act in acts]


def format_row(row: dict, cols: list[str]) -> str:
    cells = [f"{row['shape']:<17} {row['out']:>5}x{row['in']:<5} m={row['rows']:<4}",
             f"bf16 {row['bf16_us']:9.1f}us {row['bf16_GBps']:5.1f}GB/s"]
    cells += [f"{c} {row[c + '_us']:9.1f}us {row[c + '_GBps']:5.1f}GB/s x{row[c + '_x_bf16']:.2f}"
              for c in cols]
    return " | ".join(cells)


def _baseline(avx2: bool) -> str:
    """What executor/layers/cpu_gemm.pack_weight multiplies a bf16 weight through here (asked
    of pack_weight itself, which makes the choice)."""
    from pagedserve.executor.layers.cpu_gemm import pack_weight

    if avx2:
        return "panel_gemm bf16 panels"
    packed = pack_weight(torch.randn(32, 64).bfloat16())
    if packed is not None and packed.pairs is not None:
        return "panel_gemm512 paired bf16 panels (float32 FMAs)"
    return "oneDNN packed bf16" if packed is not None else "F.linear"


def run(args: argparse.Namespace) -> dict:
    from pagedserve.kernels.cpu import panel_gemm

    ql = importlib.import_module("pagedserve.kernels.cpu.quant_linear")
    if args.avx2:
        ql.BUILD_FLAGS = panel_gemm.BUILD_FLAGS = ("-mno-avx512f",)
    x_dtype = torch.float32 if args.avx2 else torch.bfloat16
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [int(r) for r in args.rows.split(",")]
    acts = args.act.split(",")
    if set(acts) - set(ACTS):
        raise SystemExit(f"--act: expected some of {', '.join(ACTS)}, got {args.act}")
    wanted = None if args.shapes is None else set(args.shapes.split(","))
    paths = {}
    for act in acts:
        ql.ACT = act
        paths[act] = ql.path()
    baseline = _baseline(args.avx2)
    print(f"{machine_description()}; quant_gemm paths: {paths}; x {x_dtype}; the 'bf16' "
          f"column: {baseline}")
    table = []
    for name, out_f, in_f in SHAPES:
        if wanted is None or name in wanted:
            table += bench_shape(name, out_f, in_f, rows, args.repeats, x_dtype, acts)
    return {"machine": machine_description(), "path": paths, "x": str(x_dtype),
            "baseline": baseline,
            "repeats": args.repeats,
            "stream_bytes": STREAM_BYTES, "results": table}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    write_results(args.out, run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
