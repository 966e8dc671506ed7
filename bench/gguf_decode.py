"""Decode speed of a GGUF file run quantized against the same file dequantized at load (and any
other model, e.g. the BF16 GGUF of the same weights), side by side in one process.

    python -m pagedserve.bench.gguf_decode [--model Q4_1.gguf] [--also BF16.gguf]
        [--model QUANTIZED_HF_DIR --dense ITS_DENSE_DIR]
        [--batch-sizes 1,16] [--tokens 33] [--rounds 5] [--dtype auto] [--act float,int8x2,int8]
        [--prefill 512] [--context 2000]

Per engine and batch size B: B greedy requests of 16 distinct prompt tokens and --tokens output
tokens, each decode step's time taken around the executor's step (inputs, forward, sampling; no
scheduler); decode tokens/s = B over the QUANTILE-th percentile of those times. Engines and batch
sizes alternate round by round. `x` is the cell over the same file dequantized at load (the last
engine). The file runs quantized once per --act (kernels/cpu/quant_linear.py's ACT: float,
int8x2 or int8 x; default: ACT as the environment sets it). With --prefill N, each round also times one
request's prompt of N tokens (all its steps; prompt tokens/s over the QUANTILE-th percentile).
With --context N the decode requests' prompts are N tokens long instead of 16, so each output
token attends to a long context (one user's long conversation); only steps in which every request
decodes one token are timed.
"""

from __future__ import annotations

import argparse
import importlib
import time
from pathlib import Path

from pagedserve.bench.results import write_results
from pagedserve.bench.roofline import machine_description

ROOT = Path(__file__).resolve().parent.parent
# A shared machine's noise only ever slows a step: a low percentile of many steps' times is what
# a quiet machine gives, and unlike the minimum it is not one lucky step.
QUANTILE = 20


def _engine(path: Path, quantized: bool, dtype: str, max_model_len: int = 256):
    """The offline engine, a GGUF file's weights loaded quantized or dense (gguf_loader's
    switch); an HF checkpoint runs in its own format whatever `quantized` says."""
    from pagedserve import LLM

    gguf_file = path.is_file()
    return LLM(path, dtype=dtype, max_model_len=max_model_len, max_num_seqs=64,
               max_num_batched_tokens=max(2048, max_model_len),
               quantization=("auto" if quantized else "dequantize") if gguf_file else None)


def _set_act(act: str | None) -> None:
    """The quantized GEMM's activation path for what runs next (None: leave it)."""
    if act is not None:
        importlib.import_module("pagedserve.kernels.cpu.quant_linear").ACT = act


def _step_times(llm, batch: int, prompt: int, tokens: int, salt: int,
                decode_only: bool = False) -> list[float]:
    """Seconds of each step of `batch` greedy requests of `prompt` distinct prompt tokens and
    `tokens` output tokens (the executor's whole step: inputs, forward, sampling); with
    decode_only, of the steps in which every request computes one token."""
    from pagedserve import SamplingParams

    vocab = llm.executor.describe().vocab_size
    prompts = [{"prompt_token_ids": [(salt * 7919 + i * 131 + j * 17) % (vocab - 100) + 100
                                     for j in range(prompt)]} for i in range(batch)]
    times: list[float] = []
    execute = llm.executor.execute

    def timed(plan, *args, **kwargs):
        start = time.perf_counter()
        try:
            return execute(plan, *args, **kwargs)
        finally:
            if not decode_only or (not plan.new_requests and all(
                    c.num_scheduled_tokens == 1 for c in plan.continuing_requests)):
                times.append(time.perf_counter() - start)

    llm.executor.execute = timed
    try:
        llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True),
                     use_tqdm=False)
    finally:
        del llm.executor.execute  # the class's method again
    return times


def _decode_steps(llm, batch: int, tokens: int, salt: int, context: int = 16) -> list[float]:
    """_step_times of the decode steps after prompts of `context` tokens."""
    return _step_times(llm, batch, context, tokens, salt, decode_only=True)


def _prefill_seconds(llm, prompt: int, salt: int) -> float:
    """Seconds of one request's prompt of `prompt` tokens: every step before its first output
    token (one, or the chunks of a chunked prompt)."""
    return sum(_step_times(llm, 1, prompt, 1, salt))


def measure(engines: dict, batches: list[int], tokens: int, rounds: int,
            acts: dict | None = None, prefill: int = 0, context: int = 16) -> dict:
    """{engine: {batch: decode tokens/s}}: batch over the QUANTILE-th percentile of its decode
    steps' times in all rounds, the engines alternating within each round (each with its
    activation path from `acts`). With `prefill`, also {"prefill": prompt tokens/s}, over the
    QUANTILE-th percentile of the rounds' prompt times."""
    acts = acts or {}
    steps = {name: {b: [] for b in batches} for name in engines}
    prompts = {name: [] for name in engines}
    for name, llm in engines.items():
        _set_act(acts.get(name))
        _decode_steps(llm, max(batches), 4, salt=0)  # warm-up: kernels built, buffers sized
    for r in range(rounds):
        for b in batches:
            for name, llm in engines.items():
                _set_act(acts.get(name))
                steps[name][b] += _decode_steps(llm, b, tokens, salt=r + 1, context=context)
        for name, llm in engines.items():
            if prefill:
                _set_act(acts.get(name))
                prompts[name].append(_prefill_seconds(llm, prefill, salt=r + 1))
    rates = {name: {b: b / _percentile(t, QUANTILE) for b, t in cells.items()}
             for name, cells in steps.items()}
    for name, times in prompts.items():
        if times:
            rates[name]["prefill"] = prefill / _percentile(times, QUANTILE)
    return rates


def _percentile(values: list[float], percent: int) -> float:
    return sorted(values)[len(values) * percent // 100]


def print_table(rates: dict, batches: list) -> None:
    reference = rates[list(rates)[-1]]
    cols = [*batches, *(["prefill"] if "prefill" in reference else [])]
    print("| engine | " + " | ".join(f"batch {b} tok/s | x" if b != "prefill"
                                     else "prefill tok/s | x" for b in cols) + " |")
    print("|---|" + "---|---|" * len(cols))
    for name, cells in rates.items():
        row = [f"{cells[b]:.1f} | {cells[b] / reference[b]:.2f}" for b in cols]
        print(f"| {name} | " + " | ".join(row) + " |")


def main(argv: list[str] | None = None) -> int:
    from pagedserve.real_model import real_model_path

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="a quantized GGUF (default: SmolLM2 Q4_1) or "
                   "quantized HF checkpoint (then give --dense)")
    p.add_argument("--dense", default=None,
                   help="the baseline instead of --model dequantized at load: the dense model a "
                        "quantized HF checkpoint was made from (`pagedserve quantize`)")
    p.add_argument("--also", action="append", default=[], help="another model to run dense")
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--tokens", type=int, default=33)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--act", default=None,
                   help="the quantized GEMM's activation paths, comma-separated (float, int8x2, int8): "
                        "one quantized engine each (default: the environment's)")
    p.add_argument("--prefill", type=int, default=0, help="also time a prompt of this many tokens")
    p.add_argument("--context", type=int, default=16,
                   help="prompt tokens of each decode request (the context its tokens attend to)")
    p.add_argument("--out", default=str(ROOT / "results" / "gguf_decode.json"))
    args = p.parse_args(argv)
    model = Path(args.model) if args.model else real_model_path()
    batches = [int(b) for b in args.batch_sizes.split(",")]
    length = max(256, args.prefill + 8, args.context + args.tokens + 8)
    engines, acts = {}, {}
    for act in args.act.split(",") if args.act else [None]:
        name = f"{model.name} quantized" + (f" ({act} x)" if act else "")
        _set_act(act)  # before the engine is built: the layer loop takes the GEMM in use then
        engines[name], acts[name] = _engine(model, True, args.dtype, length), act
    for other in args.also:
        engines[f"{Path(other).name}"] = _engine(Path(other), False, args.dtype, length)
    if args.dense:  # the baseline, last: `x` is every cell over it
        engines[f"{Path(args.dense).name} dense"] = _engine(Path(args.dense), False, args.dtype,
                                                            length)
    else:
        engines[f"{model.name} dequantized at load"] = _engine(model, False, args.dtype, length)
    rates = measure(engines, batches, args.tokens, args.rounds, acts, args.prefill, args.context)
    print_table(rates, batches)
    write_results(args.out, {"machine": machine_description(), "dtype": args.dtype,
                             "tokens": args.tokens, "quantile": QUANTILE, "prefill": args.prefill,
                             "context": args.context,
                             "rates": {n: {str(b): r for b, r in c.items()}
                                       for n, c in rates.items()}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
