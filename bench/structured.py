"""Structured outputs on the offline engine: what constraints cost a batch, and compile times.

    python -m pagedserve.bench.structured [--model DIR] [--requests 64] [--max-tokens 64]
                                          [--rounds 5]

Three runs of the same number of concurrent requests (seeded sampling, temperature 1), every one
running to max_tokens: all unconstrained (ignore_eos), all constrained by a JSON schema (an array
of at least max_tokens items of one of the suite's schemas, bench/structured_schemas.py, so none
can end early), and half and half; `--rounds` times in turn. Each figure is given two ways: the
median of the rounds' ratios, and the ratio of each run's best round (noise on a shared machine
only ever adds time, so the fastest round of each run is the one a co-tenant disturbed least; a
single round swings by 10% either way on a busy host). The figures are output tokens per second
of the whole run, the constrained run's share of the unconstrained one, and for the mixed run
the unconstrained half's tokens per second per request against the all-unconstrained run's; for
the constrained runs, where a step's extra time goes (masks filled, the wait for
them plus applying them, advancing the matchers) and the share of masks that were one forced
token (executor/structured.py's forced runs). Compile times are the executor's (a grammar to
a matcher ready for its first mask) for every schema of the suite, cold, then again (a repeated
schema must compile nothing).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from pagedserve.bench.results import write_results

ROOT = Path(__file__).resolve().parent.parent


def _run(llm, params) -> tuple[int, float, list[int]]:
    prompts = [{"prompt_token_ids": [0, 100 + i % 50, 200, 300 + i]} for i in range(len(params))]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    counts = [len(o.outputs[0].token_ids) for o in outputs]
    return sum(counts), seconds, counts


def _compile_times(model_dir: Path, vocab_size: int, eos: list[int]) -> dict:
    from pagedserve.bench.structured_schemas import schemas
    from pagedserve.executor.structured import GrammarCache, load_tokenizer
    from pagedserve.router.structured_outputs import json_schema

    cache = GrammarCache(load_tokenizer(model_dir, vocab_size, eos))  # tokenizer.json or GGUF
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


class _MaskTimer:
    """Where a constrained step's extra time goes, by wrapping the executor's StructuredOutputs
    (this process only): masks computed (on a thread beside a GPU), the wait for them, applying
    them to the logits, advancing the matchers."""

    def __init__(self, structured) -> None:
        self.seconds = {"fill": 0.0, "wait_and_apply": 0.0, "advance": 0.0}
        self.steps = 0
        for name, key in (("_fill", "fill"), ("apply", "wait_and_apply"),
                          ("advance", "advance")):
            setattr(structured, name, self._timed(getattr(structured, name), key))

    def _timed(self, fn, key: str):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[key] += time.perf_counter() - start
                self.steps += key == "fill"
        return run

    def per_step_ms(self) -> dict:
        steps = max(self.steps, 1)
        out = {f"{k}_ms_per_step": 1e3 * v / steps for k, v in self.seconds.items()}
        self.seconds = dict.fromkeys(self.seconds, 0.0)
        self.steps = 0
        return out


def _workloads(n: int, m: int) -> dict:
    from pagedserve import SamplingParams
    from pagedserve.bench.structured_schemas import schemas
    from pagedserve.sampling_params import StructuredOutputsParams

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

    return {"unconstrained": [free(i) for i in range(n)],
            "constrained": [constrained(i) for i in range(n)],
            "mixed": [free(i) if i % 2 else constrained(i) for i in range(n)]}


def _round(llm, workloads: dict, timer: _MaskTimer) -> dict:
    """One run of each workload, in turn (so a noisy neighbour hits all three alike)."""
    out = {}
    masks = llm.executor.structured.masks  # by kind: one forced token, or llguidance's mask
    for name, params in workloads.items():
        timer.per_step_ms()  # reset
        before = dict(masks)
        tokens, seconds, counts = _run(llm, params)
        row = {"tokens_per_s": tokens / seconds, "seconds": seconds}
        made = {kind: masks[kind] - before[kind] for kind in masks}
        if sum(made.values()):
            row["forced_mask_share"] = made["forced"] / sum(made.values())
        if name == "mixed":  # the unconstrained half, per request
            row["unconstrained_tokens_per_s_per_request"] = \
                sum(counts[1::2]) / len(counts[1::2]) / seconds
        if name == "unconstrained":
            row["tokens_per_s_per_request"] = tokens / seconds / len(params)
        if name != "unconstrained":
            row.update(timer.per_step_ms())
        out[name] = row
    out["constrained_share"] = out["constrained"]["tokens_per_s"] / \
        out["unconstrained"]["tokens_per_s"]
    out["mixed_unconstrained_share"] = out["mixed"]["unconstrained_tokens_per_s_per_request"] / \
        out["unconstrained"]["tokens_per_s_per_request"]
    return out


def _mask_cpu_ms(llm, params: list, steps: int = 32) -> dict:
    """CPU time per step (process time, so a busy machine's other work does not count) of the
    constrained requests' mask work alone, outside the engine: masks filled (as the executor
    does), applied to a logits batch, matchers advanced by a random allowed token. torch runs on
    one thread here: idle OpenMP workers spinning would count as process time."""
    import numpy as np
    import torch

    from pagedserve.protos import executor_pb2

    structured = llm.executor.structured
    ids = [f"mask-work-{i}" for i in range(len(params))]
    for rid, p in zip(ids, params):
        sampling = executor_pb2.SamplingParams()
        sampling.structured.grammar = p.constraint.grammar
        structured.add(rid, sampling, [])
    rng = np.random.default_rng(0)
    logits = torch.zeros(len(ids), structured.vocab_size)
    spent = {"fill": 0.0, "apply": 0.0, "advance": 0.0}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for step in range(-4, steps):  # 4 uncounted steps: the team's last spins end
            _mask_step(structured, ids, logits, rng, spent if step >= 0 else {})
    finally:
        torch.set_num_threads(threads)
        for rid in ids:
            structured.forget(rid)
    return {f"{k}_cpu_ms_per_step": 1e3 * v / steps for k, v in spent.items()}


def _mask_step(structured, ids: list[str], logits, rng, spent: dict) -> None:
    import numpy as np

    from pagedserve.executor.structured import MaskJob

    vocab = logits.shape[1]
    start = time.process_time()
    bitmask = structured._fill([(rid, i) for i, rid in enumerate(ids)], len(ids))
    lap = {"fill": time.process_time() - start}
    job = MaskJob(list(range(len(ids))), structured._pool.submit(lambda: bitmask))
    job.future.result()
    start = time.process_time()
    structured.apply(logits, job)
    lap["apply"] = time.process_time() - start
    bits = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")[:, :vocab]
    picks = [int(rng.choice(np.flatnonzero(row))) for row in bits]
    start = time.process_time()
    for rid, token in zip(ids, picks):
        structured.advance(rid, token)
    lap["advance"] = time.process_time() - start
    for key, seconds in lap.items():
        if key in spent:
            spent[key] += seconds


def summarize(rounds: list[dict]) -> dict:
    """The two shares as medians of the rounds' ratios, and as ratios of each run's best round."""
    out = {"median": {key: statistics.median(r[key] for r in rounds)
                      for key in ("constrained_share", "mixed_unconstrained_share")}}
    for name in ("unconstrained", "constrained", "mixed"):
        out["median"][name] = {k: statistics.median(r[name][k] for r in rounds)
                               for k in rounds[0][name]}
    best = {name: min(r[name]["seconds"] for r in rounds)
            for name in ("unconstrained", "constrained", "mixed")}
    # every request runs max_tokens steps in each run, so a share is a ratio of run times
    out["best_round"] = {"seconds": best,
                         "constrained_share": best["unconstrained"] / best["constrained"],
                         "mixed_unconstrained_share": best["unconstrained"] / best["mixed"]}
    return out


def print_table(results: dict) -> None:
    med, best = results["median"], results["best_round"]
    comp = results["compile"]
    print(f"\n{'figure':>46} {'median':>8} {'best round':>11} {'target':>7}")
    for label, key, target in (("constrained tok/s / unconstrained", "constrained_share", 0.90),
                               ("mixed: unconstrained half / alone", "mixed_unconstrained_share",
                                0.97)):
        print(f"{label:>46} {med[key]:>8.1%} {best[key]:>11.1%} {target:>7.0%}")
    print(f"{'compile p50 / p99 / max, ms':>46} {comp['compile_ms_p50']:.2f} / "
          f"{comp['compile_ms_p99']:.2f} / {comp['compile_ms_max']:.2f} (target p99 50)")
    print(f"{'recompiles of a repeated schema':>46} {comp['recompiles_on_repeat']}")


def main(argv: list[str] | None = None) -> int:
    from pagedserve import LLM
    from pagedserve.bench.roofline import machine_description
    from pagedserve.bench.throughput import default_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5,
                    help="rounds of the three runs in turn; figures from their medians and bests")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--out", default=str(ROOT / "results" / "structured.json"))
    args = ap.parse_args(argv)
    model = args.model or default_model("small")
    n, m = args.requests, args.max_tokens
    llm = LLM(model, dtype=args.dtype, max_num_seqs=max(n, 8))
    timer = _MaskTimer(llm.executor.structured)
    warm = _workloads(4, m)
    _run(llm, warm["unconstrained"] + warm["constrained"])  # warm-up
    rounds = [_round(llm, _workloads(n, m), timer) for _ in range(args.rounds)]
    desc = llm.executor.describe()
    results = {"machine": machine_description(), **summarize(rounds), "rounds": rounds,
               "mask_work_alone": _mask_cpu_ms(llm, _workloads(n, m)["constrained"]),
               "compile": _compile_times(Path(model), desc.vocab_size,
                                         list(desc.eos_token_ids))}
    print_table(results)
    write_results(args.out, results)
    return 0


if __name__ == "__main__":
    main()
