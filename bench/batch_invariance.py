"""What --batch-invariant costs: prompt processing and decoding with and without it, side by side.

    python -m pagedserve.bench.batch_invariance [--model PATH] [--dtype bfloat16]
        [--prompt-lens 128,512,1024] [--decode-batches 1,16] [--rounds 3]

Two engines on the same weights (one with batch_invariant=True) take turns on each case, round
after round, so a busy spell on a shared machine falls on both; the ratio is the median of the
rounds' ratios. Prompt cases time one request of that many tokens (max_tokens 1); decode cases
time `--decode-tokens` tokens for that many requests at once, after a short prompt. What the
mode adds on top of the usual CPU path is padding (a layer whose GEMM changes kernels at one row
multiplies two) and checks at load (executor/batch_invariance.py), so its cost is expected at
batch 1, if anywhere. bench/prompt_attention.py measures the attention path both modes share.
"""

from __future__ import annotations

import argparse
import statistics
import time

from pagedserve.bench.results import write_results
from pagedserve.bench.roofline import machine_description
from pagedserve.bench.throughput import ROOT


def _engines(model: str, dtype: str, quantization: str, max_len: int) -> dict:
    from pagedserve import LLM

    return {mode: LLM(model, dtype=dtype, quantization=quantization, batch_invariant=mode,
                      enable_prefix_caching=False, max_model_len=max_len)
            for mode in (False, True)}


def _tokens_per_s(llm, prompts: list[list[int]], max_tokens: int, count_prompt: bool) -> float:
    from pagedserve import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    elapsed = time.perf_counter() - start
    done = sum(len(p) for p in prompts) if count_prompt else sum(
        len(o.outputs[0].token_ids) for o in outs)
    return done / elapsed


def _cases(args: argparse.Namespace, vocab: int) -> list[tuple[str, list[list[int]], int, bool]]:
    def prompt(n: int, salt: int) -> list[int]:
        return [(salt * 7919 + i * 104729) % (vocab - 100) + 50 for i in range(n)]

    cases = [(f"prompt {n} tokens", [prompt(n, 1)], 1, True)
             for n in map(int, args.prompt_lens.split(","))]
    cases += [(f"decode batch {b}", [prompt(16, s) for s in range(b)], args.decode_tokens, False)
              for b in map(int, args.decode_batches.split(","))]
    return cases


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="model dir or GGUF (default: SmolLM2's file)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--quantization", default="auto", help="auto, or dequantize (a GGUF in bf16)")
    p.add_argument("--prompt-lens", default="128,512,1024")
    p.add_argument("--decode-batches", default="1,16")
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "results" / "batch_invariance.json"))
    args = p.parse_args(argv)
    if args.model is None:
        from pagedserve.real_model import real_model_path

        args.model = str(real_model_path())
    max_len = max(map(int, args.prompt_lens.split(","))) + args.decode_tokens + 16
    engines = _engines(args.model, args.dtype, args.quantization, max_len)
    cases = _cases(args, engines[False].executor.model_config.vocab_size)
    rows = []
    for name, prompts, max_tokens, count_prompt in cases:
        rates = {False: [], True: []}
        for _ in range(args.rounds):
            for mode, llm in engines.items():
                rates[mode].append(_tokens_per_s(llm, prompts, max_tokens, count_prompt))
        ratio = statistics.median(b / a for a, b in zip(rates[False], rates[True]))
        rows.append({"case": name, "tokens_per_s": statistics.median(rates[False]),
                     "batch_invariant_tokens_per_s": statistics.median(rates[True]),
                     "ratio": ratio, "rounds": rates[False], "rounds_invariant": rates[True]})
        print(f"{name:<20} {rows[-1]['tokens_per_s']:>9.1f} {rows[-1]['batch_invariant_tokens_per_s']:>9.1f}"
              f" {ratio:>6.2f}x", flush=True)
    print(f"\n{'case':<20} {'tok/s':>9} {'invariant':>9} {'ratio':>7}  (median of "
          f"{args.rounds} interleaved rounds; ratio = invariant / usual)")
    for r in rows:
        print(f"{r['case']:<20} {r['tokens_per_s']:>9.1f} {r['batch_invariant_tokens_per_s']:>9.1f} "
              f"{r['ratio']:>6.2f}x")
    write_results(args.out, {"model": args.model, "dtype": args.dtype,
                             "quantization": args.quantization,
                             "machine": machine_description(), "cases": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
