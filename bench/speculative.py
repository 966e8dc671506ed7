"""Speculative decoding (prompt lookup, a draft model) on the offline engine, against the same
engine without it.

    python -m pagedserve.bench.speculative [--model FILE] [--batch-sizes 1,8,32] [--rounds 2]
        [--methods ngram,draft_model] [--draft-model FILE] [--draft-layers N]

An input-grounded workload: chat requests that ask the model to repeat or lightly edit a given
text or piece of code (quoting is where prompt lookup finds its proposals). Greedy, up to
--max-tokens each. For each batch size, that many requests run at once (batch 1: one after
another), with and without speculation, the two engines alternating for --rounds rounds; the
figure is output tokens/s of the best round each, their ratio, and the drafts' acceptance.
draft_model proposes with --draft-model (default: the Q4_1 SmolLM2, a draft for the BF16 file
as --model), or with its first --draft-layers layers only (a layer-truncated copy written once
to the cache, through transformers).
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
    """Best-round tokens/s of each engine; each speculating one's ratio to "plain", its
    acceptance (accepted / proposed), mean accepted drafts per proposal and outputs differing."""
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
    row = {"batch": batch, "requests": requests, "plain_tok_s": best["plain"]}
    for name in engines.keys() - {"plain"}:
        row[f"{name}_tok_s"] = best[name]
        row[f"{name}_ratio"] = best[name] / best["plain"]
        row[f"{name}_outputs_differing"] = sum(
            a != b for a, b in zip(tokens["plain"], tokens[name]))
    return row


def _acceptance(row: dict, name: str, before, after) -> str:
    """Adds the drafts' acceptance between two stats snapshots to row; returns it as text."""
    drafted = after.spec_draft_tokens - before.spec_draft_tokens
    accepted = after.spec_accepted_tokens - before.spec_accepted_tokens
    checks = after.spec_verifications - before.spec_verifications
    row[f"{name}_acceptance"] = accepted / drafted if drafted else 0.0
    row[f"{name}_mean_accepted"] = accepted / checks if checks else 0.0
    return (f"{name} {row[f'{name}_tok_s']:7.1f} tok/s, {row[f'{name}_ratio']:.2f}x, acceptance "
            f"{row[f'{name}_acceptance']:.0%}, {row[f'{name}_mean_accepted']:.2f} accepted per "
            f"proposal, {row[f'{name}_outputs_differing']}/{row['requests']} outputs differ")


def truncated_copy(model: str, layers: int) -> str:
    """An HF-format copy of a (GGUF) model keeping its first `layers` layers, final norm and LM
    head, with its tokenizer: a cheaper draft of itself. Written once into the cache."""
    import torch
    import transformers

    from pagedserve.real_model import models_dir

    out = models_dir() / f"{Path(model).stem}-first{layers}layers"
    if (out / "config.json").is_file():
        return str(out)
    where = {"pretrained_model_name_or_path": str(Path(model).parent),
             "gguf_file": Path(model).name} if model.endswith(".gguf") else {
             "pretrained_model_name_or_path": model}
    full = transformers.AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32)
    config = full.config
    config.num_hidden_layers = layers
    small = transformers.AutoModelForCausalLM.from_config(config)
    small.load_state_dict(full.state_dict(), strict=False)  # the dropped layers' weights unused
    small.save_pretrained(out, safe_serialization=True)
    saved = json.loads((out / "config.json").read_text())
    saved.pop("quantization_config", None)  # where the GGUF came from, not how it is stored now
    (out / "config.json").write_text(json.dumps(saved, indent=2))
    transformers.AutoTokenizer.from_pretrained(**where).save_pretrained(out)
    return str(out)


def _engines(args: argparse.Namespace, model: str) -> tuple[dict, dict]:
    """The engines by name ("plain" and each method) and each method's speculative config."""
    from pagedserve import LLM
    from pagedserve.real_model import real_model_path

    specs = {}
    for method in args.methods.split(","):
        spec = {"method": method, "num_speculative_tokens": args.num_speculative_tokens}
        if method == "draft_model":
            draft = args.draft_model or str(real_model_path())
            spec["model"] = truncated_copy(draft, args.draft_layers) if args.draft_layers else draft
        specs[method] = spec
    engines = {"plain": LLM(model, dtype=args.dtype)}
    for method, spec in specs.items():
        engines[method] = LLM(model, dtype=args.dtype, speculative_config=spec)
    return engines, specs


def main(argv: list[str] | None = None) -> int:
    from pagedserve.real_model import real_model_path

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model dir or GGUF (default: SmolLM2-135M)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--requests", type=int, default=0, help="per batch size (0: 3 batches, 8 at 1)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--num-speculative-tokens", type=int, default=4)
    p.add_argument("--methods", default="ngram", help="comma-separated: ngram, draft_model")
    p.add_argument("--draft-model", default=None,
                   help="draft_model's draft (default: the Q4_1 SmolLM2 GGUF)")
    p.add_argument("--draft-layers", type=int, default=0,
                   help="draft with only the draft model's first N layers (0: all)")
    p.add_argument("--out", default=str(ROOT / "results" / "speculative.json"))
    args = p.parse_args(argv)
    model = args.model or str(real_model_path())
    engines, specs = _engines(args, model)
    rows = []
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        requests = args.requests or (8 if batch == 1 else 3 * batch)
        before = {name: engines[name].scheduler.stats() for name in specs}
        row = measure(engines, batch, requests, args.rounds, args.max_tokens)
        parts = [_acceptance(row, name, before[name], engines[name].scheduler.stats())
                 for name in specs]
        rows.append(row)
        print(f"batch {batch:3d}: plain {row['plain_tok_s']:7.1f} tok/s; " + "; ".join(parts),
              flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": model, "dtype": args.dtype, "speculative": specs,
                               "max_tokens": args.max_tokens, "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
