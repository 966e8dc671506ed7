"""Decode speed of a GGUF file run quantized against the same file dequantized at load (and any
other model, e.g. the BF16 GGUF of the same weights), side by side in one process.

    python -m pagedserve.bench.gguf_decode [--model Q4_1.gguf] [--also BF16.gguf]
        [--batch-sizes 1,16] [--tokens 33] [--rounds 5] [--dtype auto]

Per engine and batch size B: B greedy requests of 16 distinct prompt tokens and --tokens output
tokens, each decode step's time taken around the executor's step (inputs, forward, sampling; no
scheduler); decode tokens/s = B over the QUANTILE-th percentile of those times. Engines and batch
sizes alternate round by round. `x` is the cell over the same file dequantized at load (the last
engine).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from pagedserve.bench.results import write_results
from pagedserve.bench.roofline import machine_description

ROOT = Path(__file__).resolve().parent.parent
# A shared machine's noise only ever slows a step: a low percentile of many steps' times is what
# a quiet machine gives, and unlike the minimum it is not one lucky step.
QUANTILE = 20


def _engine(path: Path, quantized: bool, dtype: str):
    """The offline engine, its GGUF weights loaded quantized or dense (gguf_loader's switch)."""
    from pagedserve import LLM

    return LLM(path, dtype=dtype, max_model_len=256, max_num_seqs=64,
               quantization="auto" if quantized else "dequantize")


def _decode_steps(llm, batch: int, tokens: int, salt: int) -> list[float]:
    """Seconds of each decode step of `batch` greedy requests of 16 distinct prompt tokens (the
    executor's whole step: inputs, forward, sampling); the first step, the prompts', is left out."""
    from pagedserve import SamplingParams

    vocab = llm.executor.describe().vocab_size
    prompts = [{"prompt_token_ids": [(salt * 7919 + i * 131 + j * 17) % (vocab - 100) + 100
                                     for j in range(16)]} for i in range(batch)]
    times: list[float] = []
    execute = llm.executor.execute

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return execute(*args, **kwargs)
        finally:
            times.append(time.perf_counter() - start)

    llm.executor.execute = timed
    try:
        llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True),
                     use_tqdm=False)
    finally:
        del llm.executor.execute  # the class's method again
    return times[1:]


def measure(engines: dict, batches: list[int], tokens: int, rounds: int) -> dict:
    """{engine: {batch: decode tokens/s}}: batch over the QUANTILE-th percentile of its decode
    steps' times in all rounds, the engines alternating within each round."""
    steps = {name: {b: [] for b in batches} for name in engines}
    for llm in engines.values():
        _decode_steps(llm, max(batches), 4, salt=0)  # warm-up: kernels built, buffers sized
    for r in range(rounds):
        for b in batches:
            for name, llm in engines.items():
                steps[name][b] += _decode_steps(llm, b, tokens, salt=r + 1)
    return {name: {b: b / _percentile(t, QUANTILE) for b, t in cells.items()}
            for name, cells in steps.items()}


def _percentile(values: list[float], percent: int) -> float:
    return sorted(values)[len(values) * percent // 100]


def print_table(rates: dict, batches: list[int]) -> None:
    reference = rates[list(rates)[-1]]
    print("| engine | " + " | ".join(f"batch {b} tok/s | x" for b in batches) + " |")
    print("|---|" + "---|---|" * len(batches))
    for name, cells in rates.items():
        row = [f"{cells[b]:.1f} | {cells[b] / reference[b]:.2f}" for b in batches]
        print(f"| {name} | " + " | ".join(row) + " |")


def main(argv: list[str] | None = None) -> int:
    from pagedserve.real_model import real_model_path

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="a quantized GGUF (default: SmolLM2 Q4_1)")
    p.add_argument("--also", action="append", default=[], help="another model to run dense")
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--tokens", type=int, default=33)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--out", default=str(ROOT / "results" / "gguf_decode.json"))
    args = p.parse_args(argv)
    model = Path(args.model) if args.model else real_model_path()
    batches = [int(b) for b in args.batch_sizes.split(",")]
    engines = {f"{model.name} quantized": _engine(model, True, args.dtype)}
    for other in args.also:
        engines[f"{Path(other).name}"] = _engine(Path(other), False, args.dtype)
    engines[f"{model.name} dequantized at load"] = _engine(model, False, args.dtype)
    rates = measure(engines, batches, args.tokens, args.rounds)
    print_table(rates, batches)
    write_results(args.out, {"machine": machine_description(), "dtype": args.dtype,
                             "tokens": args.tokens, "quantile": QUANTILE,
                             "rates": {n: {str(b): r for b, r in c.items()}
                                       for n, c in rates.items()}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
