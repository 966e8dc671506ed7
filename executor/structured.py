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
from dataclasses import dataclass
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
    for field in ("min_tokens", "ignore_eos"):  # each takes away the EOS the grammar needs
        if getattr(p, field):
            raise ValueError(f"request {request_id!r}: sampling.{field} cannot be combined "
                             "with sampling.structured")


class StructuredOutputs:
    """The matchers of the constrained requests an executor holds."""

    def __init__(self, model_dir: str | Path, vocab_size: int, eos_token_ids: Sequence[int],
                 device: torch.device) -> None:
        self.model_dir = Path(model_dir)
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.device = device
        self._cache: GrammarCache | None = None  # built at the first constrained request
        self._matchers: dict[str, llguidance.LLMatcher] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-mask")
        self._llexecutor: llguidance.LLExecutor | None = None  # made at the first mask

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
        if output_token_ids and not matcher.consume_tokens(list(output_token_ids)):
            log.warning("request %s: its outputs do not replay through its grammar: %s",
                        request_id, matcher.get_error()[:200])
        self._matchers[request_id] = matcher

    def forget(self, request_id: str) -> None:
        self._matchers.pop(request_id, None)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._matchers

    def __len__(self) -> int:
        return len(self._matchers)

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
        rows = [i for i, rid in enumerate(request_ids) if rid in self._matchers]
        if not rows:
            return None
        pairs = [(self._matchers[request_ids[i]], i) for i in rows]
        if self.device.type == "cpu":
            done: Future = Future()
            done.set_result(self._fill(pairs, len(request_ids)))
            return MaskJob(rows, done)
        return MaskJob(rows, self._pool.submit(self._fill, pairs, len(request_ids)))

    def _fill(self, pairs: list[tuple[llguidance.LLMatcher, int]], num_rows: int) -> np.ndarray:
        bitmask = llg_numpy.allocate_token_bitmask(num_rows, self.vocab_size)
        if self.device.type == "cpu":
            # one matcher after another on this thread: llguidance's own pool would add a thread
            # hop and a worker that spins on a core the forward pass needs
            row_bytes = bitmask.shape[1] * bitmask.itemsize
            for matcher, row in pairs:
                matcher.unsafe_compute_mask_ptr(bitmask.ctypes.data + row * row_bytes, row_bytes)
            return bitmask
        if self._llexecutor is None:  # beside a GPU the cores are free: fill them in parallel
            self._llexecutor = llguidance.LLExecutor()
        llg_numpy.fill_next_token_bitmask_par(self._llexecutor, pairs, bitmask)
        return bitmask

    def apply(self, logits: torch.Tensor, job: MaskJob | None) -> None:
        """logits [S, V] of the sampling rows: -inf in place wherever a row's grammar forbids."""
        if job is None:
            return
        bitmask = job.future.result()  # a row per sampling row; the free ones all ones
        for j in np.flatnonzero(~bitmask.any(axis=1)):  # a matcher in error: end the request
            for eos in self.eos_token_ids:
                bitmask.view(np.uint32)[j, eos // 32] |= np.uint32(1 << (eos % 32))
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
        matcher = self._matchers.get(request_id)
        if matcher is not None and not matcher.consume_token(token_id):
            log.warning("request %s: sampled token %d left its grammar: %s", request_id,
                        token_id, matcher.get_error()[:200])
