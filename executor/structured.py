"""Structured outputs in the executor: one grammar matcher per constrained request, token masks.

Why here: the executor holds each request's tokens and samples them, so a matcher advances with
no message in between, and beside a GPU a step's masks are computed on a thread while the
model's forward pass runs (llguidance releases the GIL), so they add nothing to a step unless
they take longer than the forward (on a CPU, where the forward has every core, see start()). The
executor still keeps no knowledge the scheduler lacks: the grammar travels
in the request's SamplingParams.structured, and a matcher is rebuilt by replaying the request's
output tokens whenever the request arrives as a NewRequest (first admission, after preemption,
on a restarted executor). Prefix-cache hits and prompt chunks change nothing (only output tokens
move a matcher, and only rows that sample get a mask); n > 1 children each have their own.

One step, for the rows that sample:

    start(rows) ──thread (GPU)──> bitmask [S, ceil(V/32)] int32 (unconstrained rows: all ones)
    model forward ...
    apply(logits, job): wait, then logits[row] = -inf outside the mask, before any sampling rule
    advance(row, token) after sampling

Where the grammar forces the next tokens (a key's name, a quote: llguidance's fast-forward
tokens, the canonical tokenization of the forced bytes), the mask allows the first of them alone;
it is written as that token, and the rest of the run gives the next steps' masks with no
llguidance call (a forced mask costs llguidance as much as a free one, and most of a JSON
schema's masks are forced: docs/architecture.md, "Forced runs"). A run's tokens reach the matcher
together when it ends.

EOS is in a mask exactly when the grammar accepts (llguidance's tokenizer knows the EOS ids). A
row whose mask allows nothing (a matcher in error, which a checked grammar should never reach)
gets EOS only, so the request ends instead of drawing from an empty distribution.
"""

from __future__ import annotations

import functools
import logging
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import llguidance
import llguidance.numpy as llg_numpy
import numpy as np
import torch

from pagedserve.executor.gguf_loader import find_gguf, open_gguf
from pagedserve.executor.sampler import upload
from pagedserve.kernels.cpu.token_mask import forbid_rows
from pagedserve.protos import executor_pb2

log = logging.getLogger("pagedserve.executor")
MAX_COMPILED = 256  # compiled grammars kept (LRU), keyed by their canonical text


def allow(bitmask: np.ndarray, row: int, tokens: Sequence[int], *, only: bool = False) -> None:
    """Sets the bits of `tokens` in bitmask[row] (`only`: clears the others first)."""
    words = bitmask.view(np.uint32)
    if only:
        words[row] = 0
    for token in tokens:
        words[row, token // 32] |= np.uint32(1 << (token % 32))


@dataclass
class MaskJob:
    rows: list[int]  # positions among the step's sampling rows that are constrained
    future: Future  # -> the bitmask, [len(all sampling rows), words] int32


class GrammarCache:
    """Compiled grammars by canonical text; a request gets a copy of the compiled start state,
    so a repeated schema compiles nothing."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, capacity: int = MAX_COMPILED) -> None:
        self.tokenizer = tokenizer
        self.capacity = capacity
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self.compiles = 0

    def matcher(self, grammar: str) -> llguidance.LLMatcher:
        base = self._compiled.get(grammar)
        if base is None:
            limits = llguidance.LLParserLimits(verbose_errors=False)
            base = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0, limits=limits)
            self.compiles += 1
            self._compiled[grammar] = base
            while len(self._compiled) > self.capacity:
                self._compiled.popitem(last=False)
        else:
            self._compiled.move_to_end(grammar)
        return base.deep_copy()


def unpack_forbidden(words: torch.Tensor, width: int) -> torch.Tensor:
    """[R, W] int32 bitmask words -> [R, width] bool, True where the bit is 0 (torch ops, for
    the device the logits are on)."""
    bits = torch.arange(32, dtype=torch.int32, device=words.device)
    return ((words[:, :, None] >> bits) & 1).view(words.shape[0], -1)[:, :width] == 0


# -- the vocabulary the masks are over ------------------------------------------------------------
# A GGUF file has no tokenizer.json: llama.cpp keeps the vocabulary as metadata. The router builds
# a whole `tokenizers` tokenizer from it (router/gguf_tokenizer.py), which the import rules keep
# from the executor; a mask needs less: each token's bytes, which tokens are special, and a
# tokenizer for the text a grammar forces (llguidance tokenizes it to keep forced text in one
# tokenization). Here the bytes come from the vocabulary as llama.cpp spells it, and forced text
# is tokenized by llguidance's greedy longest match over those bytes. Outputs match the grammar
# either way (the mask is over bytes); against the router's exact BPE, 8 of 837 masks along
# random walks through 60 schemas on SmolLM2 differed, each allowing another tokenization of
# the same forced text.
_CONTROL, _UNKNOWN, _BYTE = 3, 2, 6  # llama.cpp's token types (1 normal, 4 user-defined)


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, backwards: the byte each printable stand-in is written for."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    extra = iter(range(256, 512))
    return {(chr(b) if b in printable else chr(next(extra))): b for b in range(256)}


def _token_bytes(token: str, kind: int, byte_level: bool, decoder: dict[str, int]) -> bytes:
    """A token's bytes as llguidance wants them: special ones as 0xFF + their name."""
    alphabet = set(token) <= decoder.keys()
    if kind == _UNKNOWN or (kind == _CONTROL and (alphabet or not byte_level)):
        return b"\xff" + token.encode()  # a control token spelled off the alphabet is text
    if byte_level:  # "Ġthe"; a token written in plain text (an added one) is its own bytes
        return bytes(decoder[c] for c in token) if alphabet else token.encode()
    if kind == _BYTE and token.startswith("<0x") and token.endswith(">"):
        return bytes([int(token[3:-1], 16)])  # SentencePiece's byte fallback, "<0x0A>"
    return token.replace("\u2581", " ").encode()  # SentencePiece writes a space as U+2581


class _GGUFVocabulary:
    """The duck type llguidance.TokenizerWrapper reads: token bytes, EOS/BOS, special ids, and
    a tokenize call (llguidance's greedy one, once the tokenizer exists)."""

    def __init__(self, path: Path) -> None:
        reader = open_gguf(path)

        def get(key: str, default: Any = None) -> Any:
            field = reader.get_field(key)
            return default if field is None else field.contents()

        kind = get("tokenizer.ggml.model")
        if kind not in ("gpt2", "llama"):
            raise ValueError(f"{path}: structured outputs support the 'gpt2' and 'llama' "
                             f"vocabularies, not tokenizer.ggml.model {kind!r}")
        names = list(get("tokenizer.ggml.tokens"))
        kinds = list(get("tokenizer.ggml.token_type", [1] * len(names)))
        decoder = _byte_decoder()
        self.tokens = [_token_bytes(t, k, kind == "gpt2", decoder) for t, k in zip(names, kinds)]
        self.special_token_ids = [i for i, b in enumerate(self.tokens) if b[:1] == b"\xff"]
        self.eos_token_id = get("tokenizer.ggml.eos_token_id")
        self.bos_token_id = get("tokenizer.ggml.bos_token_id")
        self.greedy: Any = None

    def __call__(self, text: bytes | str) -> list[int]:
        if self.greedy is None:  # llguidance's probe while the tokenizer is being built
            return []
        return self.greedy(text.decode("utf-8") if isinstance(text, bytes) else text)


def gguf_tokenizer(path: str | Path, vocab_size: int,
                   eos_token_ids: Sequence[int]) -> llguidance.LLTokenizer:
    """llguidance's tokenizer for a GGUF file's vocabulary, masks vocab_size wide."""
    vocabulary = _GGUFVocabulary(Path(path))
    tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(vocabulary),
                                       n_vocab=vocab_size, eos_token=list(eos_token_ids))
    vocabulary.greedy = tokenizer.greedy_tokenize  # the same trie, so no second build
    return tokenizer


@functools.lru_cache(maxsize=8)
def _vocabulary_file(model: str) -> tuple[str, Path] | None:
    """('json', tokenizer.json) or ('gguf', the file) for a model path; None: neither."""
    if (Path(model) / "tokenizer.json").is_file():
        return "json", Path(model) / "tokenizer.json"
    gguf_file = find_gguf(model)
    return ("gguf", gguf_file) if gguf_file is not None else None


def load_tokenizer(model: str | Path, vocab_size: int,
                   eos_token_ids: Sequence[int]) -> llguidance.LLTokenizer:
    """llguidance's tokenizer for a model: its tokenizer.json, or its GGUF file's vocabulary."""
    found = _vocabulary_file(str(model))
    if found is None:
        raise ValueError(f"structured outputs need {model}'s tokenizer.json or GGUF file")
    kind, path = found
    if kind == "gguf":
        return gguf_tokenizer(path, vocab_size, eos_token_ids)
    return llguidance.LLTokenizer(path.read_text(encoding="utf-8"), n_vocab=vocab_size,
                                  eos_token=list(eos_token_ids))


def check_structured(request_id: str, p: executor_pb2.SamplingParams,
                     model_dir: str | Path | None = None) -> None:
    """ValueError for a constrained request the executor cannot constrain, or that the sampler
    could leave with no token to draw."""
    if not p.HasField("structured"):
        return
    if model_dir is not None and _vocabulary_file(str(model_dir)) is None:
        raise ValueError(f"request {request_id!r}: sampling.structured needs the model's "
                         "tokenizer.json or GGUF file")
    if not p.structured.grammar:
        raise ValueError(f"request {request_id!r}: sampling.structured.grammar is empty")
    for name in ("min_tokens", "ignore_eos"):  # each takes away the EOS the grammar needs
        if getattr(p, name):
            raise ValueError(f"request {request_id!r}: sampling.{name} cannot be combined "
                             "with sampling.structured")


@dataclass
class Constrained:
    """One constrained request: its matcher, and the run of tokens its grammar forces."""

    request_id: str  # for the log
    matcher: llguidance.LLMatcher
    forced: list[int] = field(default_factory=list)  # forced from the next token on
    # forced tokens sampled and not yet given to the matcher: a run's tokens go in one call
    # when it ends (a third of the time per token), since its masks need no matcher
    behind: list[int] = field(default_factory=list)

    def caught_up(self) -> llguidance.LLMatcher:
        """The matcher, at the request's state."""
        if self.behind:
            _consume(self.matcher, self.behind, self.request_id)
            self.behind = []
        return self.matcher

    def next_forced(self) -> int | None:
        """The token the grammar forces next, or None where it leaves a choice."""
        if not self.forced:
            self.forced = self.caught_up().compute_ff_tokens()
        return self.forced[0] if self.forced else None


def _consume(matcher: llguidance.LLMatcher, tokens: list[int], request_id: str) -> None:
    if not matcher.consume_tokens(tokens):
        log.warning("request %s: sampled tokens %s left its grammar: %s", request_id,
                    tokens[-8:], matcher.get_error()[:200])


class StructuredOutputs:
    """The matchers of the constrained requests an executor holds."""

    def __init__(self, model_dir: str | Path, vocab_size: int, eos_token_ids: Sequence[int],
                 device: torch.device) -> None:
        self.model_dir = Path(model_dir)
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.device = device
        self._cache: GrammarCache | None = None  # built at the first constrained request
        self._requests: dict[str, Constrained] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-mask")
        self._llexecutor: llguidance.LLExecutor | None = None  # made at the first mask
        self.masks = {"forced": 0, "free": 0}  # masks made so far, by kind (bench.structured)

    @property
    def cache(self) -> GrammarCache:
        if self._cache is None:
            tokenizer = load_tokenizer(self.model_dir, self.vocab_size, self.eos_token_ids)
            self._cache = GrammarCache(tokenizer)
        return self._cache

    # ---- requests in and out ------------------------------------------------------------------

    def add(self, request_id: str, sampling: executor_pb2.SamplingParams,
            output_token_ids: Sequence[int]) -> None:
        """A new (or resumed) request: a matcher at the state its outputs so far lead to."""
        if not sampling.HasField("structured"):
            return
        matcher = self.cache.matcher(sampling.structured.grammar)
        if output_token_ids:
            _consume(matcher, list(output_token_ids), request_id)
        self._requests[request_id] = Constrained(request_id, matcher)

    def forget(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._requests

    def __len__(self) -> int:
        return len(self._requests)

    # ---- one step -----------------------------------------------------------------------------

    def start(self, request_ids: Sequence[str]) -> MaskJob | None:
        """The masks of the step's sampling rows; None when none is constrained. Call before the
        forward pass; the matchers must not move until apply(). Beside a GPU they are computed
        on a thread while the forward pass runs. On a CPU they are computed here and now: the
        forward pass's OpenMP team has every core, so a mask thread beside it only takes its time
        from the forward (and stalls the team's barriers when it preempts one of its threads).
        Measured, 64 requests on the `small` model, 2 cores: masks here kept a mixed batch's
        unconstrained requests at 93.5-94.2% of their speed alone, against 92.9-93.2% on a
        thread at a lower priority (docs/benchmarks.md, "Structured outputs")."""
        rows = [i for i, rid in enumerate(request_ids) if rid in self._requests]
        if not rows:
            return None
        pairs = [(request_ids[i], i) for i in rows]
        if self.device.type == "cpu":
            done: Future = Future()
            done.set_result(self._fill(pairs, len(request_ids)))
            return MaskJob(rows, done)
        return MaskJob(rows, self._pool.submit(self._fill, pairs, len(request_ids)))

    def _fill(self, pairs: list[tuple[str, int]], num_rows: int) -> np.ndarray:
        """The masks of the rows `pairs` names (request id, row); the other rows all ones. A
        matcher in error allows nothing: its row gets EOS, so that the request ends."""
        bitmask = llg_numpy.allocate_token_bitmask(num_rows, self.vocab_size)
        free = []  # (matcher, row) of the rows whose grammar leaves a choice
        for request_id, row in pairs:
            request = self._requests[request_id]
            token = request.next_forced()
            if token is not None:
                allow(bitmask, row, [token], only=True)
            else:
                free.append((request.matcher, row))
        self._fill_free(free, bitmask)
        self.masks["forced"] += len(pairs) - len(free)
        self.masks["free"] += len(free)
        for matcher, row in free:
            if matcher.is_error():
                allow(bitmask, row, self.eos_token_ids)
        return bitmask

    def _fill_free(self, pairs: list[tuple[llguidance.LLMatcher, int]],
                   bitmask: np.ndarray) -> None:
        if not pairs:
            return
        if self.device.type == "cpu":
            # one matcher after another on this thread: llguidance's own pool would add a thread
            # hop and a worker that spins on a core the forward pass needs
            row_bytes = bitmask.shape[1] * bitmask.itemsize
            for matcher, row in pairs:
                matcher.unsafe_compute_mask_ptr(bitmask.ctypes.data + row * row_bytes, row_bytes)
            return
        if self._llexecutor is None:  # beside a GPU the cores are free: fill them in parallel
            self._llexecutor = llguidance.LLExecutor()
        llg_numpy.fill_next_token_bitmask_par(self._llexecutor, pairs, bitmask)

    def apply(self, logits: torch.Tensor, job: MaskJob | None) -> None:
        """logits [S, V] of the sampling rows: -inf in place wherever a row's grammar forbids."""
        if job is None:
            return
        bitmask = job.future.result()  # a row per sampling row; the free ones all ones
        if forbid_rows(logits, job.rows, bitmask):  # the CPU, float32 logits: token_mask.c
            return
        words = torch.from_numpy(bitmask[job.rows])
        if self.device.type != "cpu":  # the packed words travel: 32 times fewer bytes
            words = words.pin_memory().to(self.device, non_blocking=True)  # pinned: non-blocking
        forbidden = unpack_forbidden(words, logits.shape[1])
        index = upload(job.rows, torch.int64, self.device)
        logits[index] = logits[index].masked_fill(forbidden, float("-inf"))

    def advance(self, request_id: str, token_id: int) -> None:
        """The sampled token moves the request's matcher (a no-op for unconstrained ones)."""
        request = self._requests.get(request_id)
        if request is None:
            return
        if request.forced and request.forced[0] == token_id:
            request.forced.pop(0)  # the run goes on: its next token is the next mask
            request.behind.append(token_id)
            return
        request.forced = []  # off the run (a matcher in error ends with EOS): ask again
        request.behind.append(token_id)
        request.caught_up()
