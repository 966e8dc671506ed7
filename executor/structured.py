"""Structured outputs in the executor: one grammar matcher per constrained request, token masks.

Why here: the executor holds each request's tokens and samples them, so a matcher advances with
no message in between, and a step's masks are computed on a thread while the model's forward
pass runs (llguidance releases the GIL), so they add nothing to a step unless they take longer
than the forward. The executor still keeps no knowledge the scheduler lacks: the grammar travels
in the request's SamplingParams.structured, and a matcher is rebuilt by replaying the request's
output tokens whenever the request arrives as a NewRequest (first admission, after preemption,
on a restarted executor). Prefix-cache hits and prompt chunks change nothing (only output tokens
move a matcher, and only rows that sample get a mask); n > 1 children each have their own.

One step, for the rows that sample:

    start(rows) ──thread──> bitmask [S, ceil(V/32)] int32 (unconstrained rows: all ones)
    model forward ...
    apply(logits, job): wait, then logits[row] = -inf outside the mask, before any sampling rule
    advance(row, token) after sampling

EOS is in a mask exactly when the grammar accepts (llguidance's tokenizer knows the EOS ids). A
row whose mask allows nothing (a matcher in error, which a checked grammar should never reach)
gets EOS only, so the request ends instead of drawing from an empty distribution.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import llguidance
import llguidance.numpy as llg_numpy
import numpy as np
import torch

from pagedserve.executor.sampler import upload
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


def check_structured(request_id: str, p: executor_pb2.SamplingParams,
                     model_dir: str | Path | None = None) -> None:
    """ValueError for a constrained request the executor cannot constrain, or that the sampler
    could leave with no token to draw."""
    if not p.HasField("structured"):
        return
    if model_dir is not None and not (Path(model_dir) / "tokenizer.json").is_file():
        raise ValueError(f"request {request_id!r}: sampling.structured needs the model's "
                         "tokenizer.json")
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
            path = self.model_dir / "tokenizer.json"
            if not path.exists():
                raise ValueError(f"structured outputs need {path} (the grammar engine reads it)")
            tokenizer = llguidance.LLTokenizer(path.read_text(encoding="utf-8"),
                                               n_vocab=self.vocab_size,
                                               eos_token=self.eos_token_ids)
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
        """Compute the masks of the step's sampling rows on a thread; None when none is
        constrained. Call before the forward pass; the matchers must not move until apply()."""
        rows = [i for i, rid in enumerate(request_ids) if rid in self._matchers]
        if not rows:
            return None
        pairs = [(self._matchers[request_ids[i]], i) for i in rows]
        return MaskJob(rows, self._pool.submit(self._fill, pairs, len(request_ids)))

    def _fill(self, pairs: list[tuple[llguidance.LLMatcher, int]], num_rows: int) -> np.ndarray:
        if self._llexecutor is None:
            # On a CPU the forward pass has every core: one mask worker, not a pool that would
            # take cores from torch's OpenMP team (whose barriers stall when one is preempted).
            cpu = self.device.type == "cpu"
            self._llexecutor = llguidance.LLExecutor(num_threads=1 if cpu else None)
        bitmask = llg_numpy.allocate_token_bitmask(num_rows, self.vocab_size)
        llg_numpy.fill_next_token_bitmask_par(self._llexecutor, pairs, bitmask)
        return bitmask

    def apply(self, logits: torch.Tensor, job: MaskJob | None) -> None:
        """logits [S, V] of the sampling rows: -inf in place wherever a row's grammar forbids."""
        if job is None:
            return
        bitmask = job.future.result()[job.rows]
        for j in np.flatnonzero(~bitmask.any(axis=1)):  # a matcher in error: end the request
            for eos in self.eos_token_ids:
                bitmask.view(np.uint32)[j, eos // 32] |= np.uint32(1 << (eos % 32))
        forbidden = self._forbidden(bitmask, logits.shape[1])
        if len(job.rows) == logits.shape[0]:
            logits.masked_fill_(forbidden, float("-inf"))
            return
        index = upload(job.rows, torch.int64, self.device)
        logits[index] = logits[index].masked_fill(forbidden, float("-inf"))

    def _forbidden(self, bitmask: np.ndarray, width: int) -> torch.Tensor:
        """[R, width] bool, True where a bit is 0. On a CPU unpacked by numpy in one call; on a
        GPU the packed words travel (32 times fewer bytes) and are unpacked there."""
        if self.device.type == "cpu":
            bits = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")[:, :width]
            return torch.from_numpy(bits == 0)
        words = torch.from_numpy(bitmask).pin_memory()  # a non-blocking copy needs pinned memory
        return unpack_forbidden(words.to(self.device, non_blocking=True), width)

    def advance(self, request_id: str, token_id: int) -> None:
        """The sampled token moves the request's matcher (a no-op for unconstrained ones)."""
        matcher = self._matchers.get(request_id)
        if matcher is not None and not matcher.consume_token(token_id):
            log.warning("request %s: sampled token %d left its grammar: %s", request_id,
                        token_id, matcher.get_error()[:200])
