"""Grammar engines side by side: compile time and per-token mask time (how llguidance was chosen).

    python -m pagedserve.bench.grammar_engines MODEL_DIR [--vocab N]

For each schema, regex and grammar below: the cold compile (grammar text to a matcher ready for
its first mask) and the mean time of one next-token mask along a 64-token walk that draws
uniformly among the allowed tokens (fixed seed, so both engines walk comparable paths). xgrammar
is measured only where it is installed (it is not a dependency: it imports torch and
transformers, which the router may not).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

SCHEMAS = {
    "flat object": {"type": "object", "properties": {"name": {"type": "string"},
                                                     "age": {"type": "integer"}},
                    "required": ["name", "age"], "additionalProperties": False},
    "nested, arrays, enums": {
        "type": "object", "additionalProperties": False, "required": ["user", "tags"],
        "properties": {
            "user": {"type": "object", "required": ["id", "role"], "additionalProperties": False,
                     "properties": {"id": {"type": "integer", "minimum": 0},
                                    "role": {"enum": ["admin", "user", "guest"]}}},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 8},
                     "minItems": 1, "maxItems": 4}}},
    "refs and unions": {
        "$defs": {"point": {"type": "object", "required": ["x", "y"],
                            "additionalProperties": False,
                            "properties": {"x": {"type": "number"}, "y": {"type": "number"}}}},
        "type": "object", "required": ["shape"], "additionalProperties": False,
        "properties": {"shape": {"anyOf": [{"$ref": "#/$defs/point"},
                                           {"type": "array", "items": {"$ref": "#/$defs/point"}},
                                           {"type": "null"}]}}},
    "patterns, formats": {
        "type": "object", "required": ["email", "date", "code"], "additionalProperties": False,
        "properties": {"email": {"type": "string", "format": "email"},
                       "date": {"type": "string", "format": "date"},
                       "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}}},
}
REGEX = r"(\+\d{1,3} )?\(\d{3}\) \d{3}-\d{4}"
LARK = 'start: expr\nexpr: term (("+" | "-") term)*\nterm: NUMBER | "(" expr ")"\nNUMBER: /[0-9]+/\n'


def _walk(fill: Callable[[np.ndarray], None], consume: Callable[[int], bool], words: int,
          vocab: int, steps: int = 64) -> float:
    """Mean seconds per mask over a random walk through allowed tokens."""
    rng, mask, spent, done = random.Random(0), np.zeros((1, words), dtype=np.int32), 0.0, 0
    for _ in range(steps):
        start = time.perf_counter()
        fill(mask)
        spent += time.perf_counter() - start
        done += 1
        bits = np.unpackbits(mask.view(np.uint8), bitorder="little")[:vocab]
        allowed = np.flatnonzero(bits)
        if len(allowed) == 0 or not consume(int(rng.choice(list(allowed)))):
            break
    return spent / done


def llguidance_case(tok_json: str, vocab: int, eos: int, kind: str, spec) -> tuple[float, float]:
    import llguidance
    import llguidance.numpy as lln

    tok = llguidance.LLTokenizer(tok_json, n_vocab=vocab, eos_token=eos)
    start = time.perf_counter()
    if kind == "json":
        spec = dict(spec, **{"x-guidance": {"whitespace_flexible": False}})
        grammar = llguidance.LLMatcher.grammar_from_json_schema(spec)
    elif kind == "regex":
        grammar = llguidance.LLMatcher.grammar_from_regex(spec)
    else:
        grammar = llguidance.LLMatcher.grammar_from_lark(spec)
    m = llguidance.LLMatcher(tok, grammar)
    compile_s = time.perf_counter() - start
    assert not m.is_error(), m.get_error()
    def consume(token: int) -> bool:
        return m.consume_token(token) and not m.is_stopped()

    return compile_s, _walk(lambda b: lln.fill_next_token_bitmask(m, b), consume,
                            (vocab + 31) // 32, vocab)


def xgrammar_case(model_dir: Path, vocab: int, kind: str, spec) -> tuple[float, float]:
    import torch
    import xgrammar as xgr
    from transformers import AutoTokenizer

    info = xgr.TokenizerInfo.from_huggingface(AutoTokenizer.from_pretrained(model_dir),
                                              vocab_size=vocab)
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    start = time.perf_counter()
    if kind == "json":
        compiled = compiler.compile_json_schema(json.dumps(spec), any_whitespace=False)
    elif kind == "regex":
        compiled = compiler.compile_regex(spec)
    else:
        compiled = compiler.compile_grammar(xgr.Grammar.from_ebnf(_lark_to_ebnf(spec)))
    m = xgr.GrammarMatcher(compiled)
    compile_s = time.perf_counter() - start

    def fill(mask: np.ndarray) -> None:
        t = torch.from_numpy(mask)
        m.fill_next_token_bitmask(t)

    def consume(token: int) -> bool:
        return m.accept_token(token) and not m.is_terminated()

    return compile_s, _walk(fill, consume, (vocab + 31) // 32, vocab)


def _lark_to_ebnf(_: str) -> str:
    return ('root ::= expr\nexpr ::= term (("+" | "-") term)*\n'
            'term ::= [0-9]+ | "(" expr ")"\n')


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--vocab", type=int, default=0, help="mask width (default: the tokenizer's)")
    args = ap.parse_args()
    tok_json = (args.model_dir / "tokenizer.json").read_text()
    config = json.loads((args.model_dir / "config.json").read_text())
    vocab = args.vocab or config["vocab_size"]
    eos = config["eos_token_id"]
    eos = eos[0] if isinstance(eos, list) else eos
    cases = [("json", name, s) for name, s in SCHEMAS.items()]
    cases += [("regex", "phone regex", REGEX), ("lark", "arithmetic grammar", LARK)]
    engines: dict[str, Callable] = {
        "llguidance": lambda k, s: llguidance_case(tok_json, vocab, eos, k, s)}
    try:
        import xgrammar  # noqa: F401

        engines["xgrammar"] = lambda k, s: xgrammar_case(args.model_dir, vocab, k, s)
    except ImportError:
        pass
    print(f"vocab {vocab}; compile ms / mask us per token")
    for kind, name, spec in cases:
        row = [f"{name:24s}"]
        for engine, run in engines.items():
            compile_s, mask_s = run(kind, spec)
            row.append(f"{engine}: {compile_s * 1e3:8.2f} ms {mask_s * 1e6:8.1f} us")
        print("  ".join(row), flush=True)


if __name__ == "__main__":
    main()
