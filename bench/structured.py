"""Structured outputs on the offline engine: what constraints cost a batch, and compile times.

    python -m pagedserve.bench.structured [--model DIR] [--requests 64] [--max-tokens 64]

Three runs of the same number of concurrent requests (seeded sampling, temperature 1), every one
running to max_tokens: all unconstrained (ignore_eos), all constrained by a JSON schema (an array
of at least max_tokens items of one of the suite's schemas, bench/structured_schemas.py, so none
can end early), and half and half. The
figures are output tokens per second of the whole run, and for the mixed run also the
unconstrained half's tokens per second per request against the all-unconstrained run's. Compile
times are the executor's (a grammar to a matcher ready for its first mask) for every schema of
the suite, cold, then again (a repeated schema must compile nothing).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(llm, params) -> tuple[int, float, list[int]]:
    prompts = [{"prompt_token_ids": [0, 100 + i % 50, 200, 300 + i]} for i in range(len(params))]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    counts = [len(o.outputs[0].token_ids) for o in outputs]
    return sum(counts), seconds, counts


def _compile_times(model_dir: Path, vocab_size: int, eos: list[int]) -> dict:
    import llguidance

    from pagedserve.bench.structured_schemas import schemas
    from pagedserve.executor.structured import GrammarCache
    from pagedserve.router.structured_outputs import json_schema

    tokenizer = llguidance.LLTokenizer((model_dir / "tokenizer.json").read_text(),
                                       n_vocab=vocab_size, eos_token=eos)
    cache = GrammarCache(tokenizer)
    grammars = [json_schema(s, "bench").grammar for s in schemas()]
    times = []
    for g in grammars:
        start = time.perf_counter()
        cache.matcher(g).compute_bitmask()  # compiled and ready: its first mask computed
        times.append(time.perf_counter() - start)
    before = cache.compiles
    for g in grammars:
        cache.matcher(g)
    times.sort()
    return {"schemas": len(grammars), "compile_ms_p50": 1e3 * statistics.median(times),
            "compile_ms_p99": 1e3 * times[int(0.99 * (len(times) - 1))],
            "compile_ms_max": 1e3 * times[-1], "recompiles_on_repeat": cache.compiles - before}


def main() -> None:
    from pagedserve import LLM, SamplingParams
    from pagedserve.bench.structured_schemas import schemas
    from pagedserve.bench.throughput import default_model
    from pagedserve.sampling_params import StructuredOutputsParams

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()
    model = args.model or default_model("small")
    n, m = args.requests, args.max_tokens
    llm = LLM(model, dtype=args.dtype, max_num_seqs=max(n, 8))
    suite = schemas()

    def free(i: int) -> SamplingParams:
        return SamplingParams(temperature=1.0, seed=i, max_tokens=m, ignore_eos=True)

    def constrained(i: int) -> SamplingParams:
        # an array of the suite's schemas too long to end before max_tokens: every request
        # runs as long as an unconstrained one, so the runs compare like with like
        item = suite[i % len(suite)]
        schema = {"type": "array", "minItems": m,  # its $defs stay at the root, where $refs point
                  "items": {k: v for k, v in item.items() if k != "$defs"},
                  **({"$defs": item["$defs"]} if "$defs" in item else {})}
        so = StructuredOutputsParams(json=schema)
        return SamplingParams(temperature=1.0, seed=i, max_tokens=m, structured_outputs=so)

    _run(llm, [free(i) for i in range(4)] + [constrained(i) for i in range(4)])  # warm-up
    results = {}
    for name, params in [("unconstrained", [free(i) for i in range(n)]),
                         ("constrained", [constrained(i) for i in range(n)]),
                         ("mixed", [free(i) if i % 2 else constrained(i) for i in range(n)])]:
        tokens, seconds, counts = _run(llm, params)
        results[name] = {"output_tokens": tokens, "seconds": seconds,
                         "tokens_per_s": tokens / seconds}
        if name == "mixed":
            results[name]["unconstrained_tokens_per_s_per_request"] = \
                sum(counts[1::2]) / len(counts[1::2]) / seconds
    results["unconstrained"]["tokens_per_s_per_request"] = \
        results["unconstrained"]["tokens_per_s"] / n
    desc = llm.executor.describe()
    results["compile"] = _compile_times(Path(model), desc.vocab_size, list(desc.eos_token_ids))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
