"""A constraint's grammar compiled once in the router, within bounds, so a bad one is a 400.

llguidance builds its lexer and parser lazily, bounded by fuel (LLParserLimits: work per
compile and per mask step), so no schema can hang it; on top of that the check has a wall-clock
deadline. The check builds a matcher for the model's tokenizer and computes its first token mask,
which is where a pathological regex would show (the lexer meets the whole vocabulary). Grammars
that passed are remembered (LRU), so a repeated schema costs a dictionary lookup.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import llguidance
import llguidance.numpy as llg_numpy

from pagedserve.router.errors import invalid_request
from pagedserve.router.structured_outputs import Constraint

COMPILE_TIMEOUT_S = 2.0
MAX_REMEMBERED = 1024
_MAX_MESSAGE = 300
# llguidance's default fuel (a mask step's lexer work is capped at about 14 ms); its messages
# without the parser state dump, which would echo the schema back.
LIMITS = {"verbose_errors": False}


def parser_limits() -> llguidance.LLParserLimits:
    return llguidance.LLParserLimits(**LIMITS)


def make_tokenizer(tokenizer_json: str, vocab_size: int,
                   eos_token_ids: Sequence[int]) -> llguidance.LLTokenizer:
    """llguidance's view of a `tokenizers` tokenizer.json, masks vocab_size wide (the model's
    rows, which may exceed the tokenizer's), EOS allowed where the grammar accepts."""
    return llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size,
                                  eos_token=list(eos_token_ids))


def grammar_error(grammar: str, tokenizer: llguidance.LLTokenizer) -> str | None:
    """Why the grammar cannot constrain this tokenizer's output, or None when it can."""
    error = llguidance.LLMatcher.validate_grammar(grammar, tokenizer, limits=parser_limits())
    if error:
        return error
    matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0, limits=parser_limits())
    if not matcher.is_error():
        mask = llg_numpy.allocate_token_bitmask(1, tokenizer.vocab_size)
        llg_numpy.fill_next_token_bitmask(matcher, mask)
    return matcher.get_error() if matcher.is_error() else None


def describe(error: str) -> str:
    """llguidance's message, short, with its unsupported-keyword case said plainly."""
    lines = error.strip().splitlines() or ["invalid grammar"]
    first = lines[0]
    detail = next((ln.strip() for ln in lines[1:] if ln.strip().startswith("error:")), None)
    if detail:  # regex errors put the reason on a line of its own
        first = f"{first} {detail}"
    if first.startswith("Unimplemented keys"):
        first = "unsupported JSON schema keyword(s): " + first.partition(":")[2].strip()
    elif first.isalnum():  # a bare stop reason: the matcher had nothing to allow from the start
        first = f"the constraint admits no output ({first})"
    return first[:_MAX_MESSAGE]


class GrammarChecker:
    """Checks constraints against one model's tokenizer; thread-safe."""

    def __init__(self, tokenizer: llguidance.LLTokenizer,
                 timeout_s: float = COMPILE_TIMEOUT_S) -> None:
        self.tokenizer = tokenizer
        self.timeout_s = timeout_s
        self._passed: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        # Its own threads: a compile past its deadline keeps one busy until its fuel runs out.
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="grammar-check")

    def check(self, c: Constraint) -> None:
        """400 naming c.param when its grammar does not compile, or not within the deadline."""
        with self._lock:
            if c.grammar in self._passed:
                self._passed.move_to_end(c.grammar)
                return
        future = self._pool.submit(grammar_error, c.grammar, self.tokenizer)
        try:
            error = future.result(timeout=self.timeout_s)
        except FutureTimeout:
            raise invalid_request(f"{c.param}: the constraint did not compile within "
                                  f"{self.timeout_s:g} s; simplify it", c.param) from None
        if error is not None:
            raise invalid_request(f"{c.param}: {describe(error)}", c.param)
        with self._lock:
            self._passed[c.grammar] = None
            while len(self._passed) > MAX_REMEMBERED:
                self._passed.popitem(last=False)
