"""Speculative decoding (prompt lookup) on the offline engine, against the same engine without it.

    python -m pagedserve.bench.speculative [--model FILE] [--batch-sizes 1,8,32] [--rounds 2]

An input-grounded workload: chat requests that ask the model to repeat or lightly edit a given
text or piece of code (quoting is where prompt lookup finds its proposals). Greedy, up to
--max-tokens each. For each batch size, that many requests run at once (batch 1: one after
another), with and without speculation, the two engines alternating for --rounds rounds; the
figure is output tokens/s of the best round each, their ratio, and the drafts' acceptance.
Greedy outputs are compared: the run reports how many requests differ (bf16 near-ties may flip,
as batching can flip them; float32 gives none).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

TEXTS = [
    "def mean(values):\n    total = 0\n    for v in values:\n        total += v\n"
    "    return total / len(values)\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n"
    "        self.items.append(item)\n\n    def pop(self):\n        return self.items.pop()\n",
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It "
    "is named after the engineer Gustave Eiffel, whose company designed and built the tower.",
    "SELECT name, email FROM users WHERE active = 1 ORDER BY created_at DESC LIMIT 10;",
    "Water boils at 100 degrees Celsius at sea level. At higher altitudes the air pressure is "
    "lower, so water boils at a lower temperature.",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i, 'is even')\n    else:\n"
    "        print(i, 'is odd')\n",
]
TASKS = ["Repeat the following text exactly, with no other words:\n\n{}",
         "Rewrite the following, changing nothing but fixing any spelling:\n\n{}",
         "Copy this text and add one short sentence at the end:\n\n{}"]


def conversations(n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": TASKS[i % len(TASKS)].format(TEXTS[i % len(TEXTS)])}]
            for i in range(n)]


def _timed(llm, convs, params, batch: int) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    outs = []
    for i in range(0, len(convs), batch):
        outs += llm.chat(convs[i:i + batch], params, use_tqdm=False)
    seconds = time.perf_counter() - start
    return seconds, [o.outputs[0].token_ids for o in outs]


def measure(engines: dict, batch: int, requests: int, rounds: int, max_tokens: int) -> dict:
    from pagedserve import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    convs = conversations(requests)
    best: dict[str, float] = {}
    tokens: dict[str, list[list[int]]] = {}
    for _ in range(rounds):
        for name, llm in engines.items():
            seconds, ids = _timed(llm, convs, params, batch)
            rate = sum(map(len, ids)) / seconds
            best[name] = max(best.get(name, 0.0), rate)
            tokens[name] = ids
    differ = sum(a != b for a, b in zip(tokens["plain"], tokens["ngram"]))
    return {"batch": batch, "requests": requests, "plain_tok_s": best["plain"],
            "ngram_tok_s": best["ngram"], "ratio": best["ngram"] / best["plain"],
            "outputs_differing": differ}


def main(argv: list[str] | None = None) -> int:
    from pagedserve import LLM
    from pagedserve.real_model import real_model_path

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model dir or GGUF (default: SmolLM2-135M)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--requests", type=int, default=0, help="per batch size (0: 3 batches, 8 at 1)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--num-speculative-tokens", type=int, default=4)
    p.add_argument("--out", default=str(ROOT / "results" / "speculative.json"))
    args = p.parse_args(argv)
    model = args.model or str(real_model_path())
    spec = {"method": "ngram", "num_speculative_tokens": args.num_speculative_tokens}
    engines = {"plain": LLM(model, dtype=args.dtype),
               "ngram": LLM(model, dtype=args.dtype, speculative_config=spec)}
    rows = []
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        requests = args.requests or (8 if batch == 1 else 3 * batch)
        before = engines["ngram"].scheduler.stats()
        row = measure(engines, batch, requests, args.rounds, args.max_tokens)
        after = engines["ngram"].scheduler.stats()
        drafted = after.spec_draft_tokens - before.spec_draft_tokens
        accepted = after.spec_accepted_tokens - before.spec_accepted_tokens
        checks = after.spec_verifications - before.spec_verifications
        row.update(acceptance=accepted / drafted if drafted else 0.0,
                   mean_accepted=accepted / checks if checks else 0.0)
        rows.append(row)
        print(f"batch {batch:3d}: plain {row['plain_tok_s']:7.1f} tok/s, ngram "
              f"{row['ngram_tok_s']:7.1f} tok/s, {row['ratio']:.2f}x; acceptance "
              f"{row['acceptance']:.0%}, {row['mean_accepted']:.2f} accepted per proposal; "
              f"{row['outputs_differing']}/{requests} outputs differ", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": model, "dtype": args.dtype, "speculative": spec,
                               "max_tokens": args.max_tokens, "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
