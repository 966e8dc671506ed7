"""A small plan-driving harness: the scheduler's side of the step contract, for executor tests.

It hands out block ids (from a shuffled pool, so block tables are not contiguous), schedules each
request's prompt in one chunk or several, then one decode token per step, and collects what the
executor returns. It can preempt a request (forget it, free its blocks, re-send it whole with its
outputs so far: recompute) and start a request on cached blocks of another (a prefix-cache hit).
It never stops on EOS: a request runs until max_tokens.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from pagedserve.protos import executor_pb2


@dataclass
class Completion:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[tuple[list[int], list[float]]] = field(default_factory=list)  # per token: ids, logprobs


@dataclass
class _Request:
    request_id: str
    prompt: list[int]
    sampling: executor_pb2.SamplingParams
    max_tokens: int
    chunks: itertools.cycle | None  # prompt chunk sizes, cycled; None: all at once
    preempt_at: set[int]  # output counts at which the harness preempts the request
    blocks: list[int] = field(default_factory=list)
    num_cached: int = 0  # tokens already in the cache when first sent (a prefix hit)
    num_computed: int = 0
    sent_blocks: int = 0  # how many of `blocks` the executor has been told about
    sent: bool = False
    keep_blocks: bool = False  # on finishing, leave the blocks allocated (a prefix to share)
    out: Completion = field(default_factory=Completion)

    @property
    def held(self) -> int:
        return len(self.prompt) + len(self.out.tokens)


class Harness:
    def __init__(self, executor, *, seed: int = 0):
        self.executor = executor
        desc = executor.describe()
        self.block_size = desc.block_size
        self.max_num_batched_tokens = executor.config.max_num_batched_tokens
        self.free = list(range(desc.num_kv_blocks))
        random.Random(seed).shuffle(self.free)
        self.requests: dict[str, _Request] = {}
        self.finished: dict[str, _Request] = {}
        self.forget: list[str] = []
        self.step_id = 0

    def add(self, request_id: str, prompt: Sequence[int], sampling: executor_pb2.SamplingParams, *,
            max_tokens: int, chunk_sizes: Sequence[int] | int | None = None,
            preempt_at: Sequence[int] = (), prefix_of: str | None = None, num_cached: int = 0,
            keep_blocks: bool = False) -> None:
        """Queue a request. With prefix_of, its first num_cached tokens (whole blocks) reuse the
        cached blocks of that (finished, keep_blocks) request, which must share those tokens."""
        if isinstance(chunk_sizes, int):
            chunk_sizes = [chunk_sizes]
        r = _Request(request_id, list(prompt), sampling, max_tokens,
                     itertools.cycle(chunk_sizes) if chunk_sizes else None, set(preempt_at),
                     keep_blocks=keep_blocks)
        if prefix_of is not None:
            assert num_cached % self.block_size == 0 and num_cached < len(prompt)
            donor = self.finished[prefix_of]
            assert donor.prompt[:num_cached] == r.prompt[:num_cached]
            r.blocks = donor.blocks[: num_cached // self.block_size]
            r.num_cached = r.num_computed = num_cached
        self.requests[request_id] = r

    def run(self) -> dict[str, Completion]:
        """Step until every request has its max_tokens outputs; returns them by request id."""
        while self.requests:
            self.step()
        return {rid: r.out for rid, r in self.finished.items()}

    def step(self) -> executor_pb2.StepResult:
        self.step_id += 1
        plan = executor_pb2.StepPlan(step_id=self.step_id, forget_request_ids=self.forget)
        self.forget = []
        budget = self.max_num_batched_tokens
        scheduled: dict[str, int] = {}
        for r in self.requests.values():
            n = min(r.held - r.num_computed, budget)
            if r.num_computed < len(r.prompt) and r.chunks is not None:
                n = min(n, next(r.chunks))
            if n <= 0:
                continue
            budget -= n
            scheduled[r.request_id] = n
            self._allocate(r, r.num_computed + n)
            self._add_to_plan(plan, r, n)
        result = self.executor.execute(plan)
        self._take_result(result, scheduled)
        return result

    def _allocate(self, r: _Request, num_tokens: int) -> None:
        while len(r.blocks) * self.block_size < num_tokens:
            r.blocks.append(self.free.pop())

    def _add_to_plan(self, plan: executor_pb2.StepPlan, r: _Request, n: int) -> None:
        if not r.sent:
            plan.new_requests.add(
                request_id=r.request_id, prompt_token_ids=r.prompt, output_token_ids=r.out.tokens,
                sampling=r.sampling, block_ids=r.blocks, num_computed_tokens=r.num_computed,
                num_scheduled_tokens=n)
            r.sent = True
        else:
            plan.continuing_requests.add(request_id=r.request_id,
                                         new_block_ids=r.blocks[r.sent_blocks:],
                                         num_scheduled_tokens=n)
        r.sent_blocks = len(r.blocks)

    def _take_result(self, result: executor_pb2.StepResult, scheduled: dict[str, int]) -> None:
        outputs = {o.request_id: o for o in result.outputs}
        for rid, n in scheduled.items():
            r = self.requests[rid]
            r.num_computed += n
            reached_end = r.num_computed == r.held
            assert (rid in outputs) == reached_end, f"{rid}: output iff the held tokens are computed"
            if reached_end:
                self._append(r, outputs[rid])
        assert set(outputs) <= set(scheduled), "outputs for requests that were not scheduled"

    def _append(self, r: _Request, o: executor_pb2.RequestOutput) -> None:
        assert len(o.token_ids) == 1
        r.out.tokens.append(o.token_ids[0])
        if r.sampling.HasField("logprobs"):
            assert len(o.logprobs) == 1
            r.out.logprobs.append(o.logprobs[0])
            if r.sampling.logprobs > 0:
                assert len(o.top_logprobs) == 1
                top = o.top_logprobs[0]
                r.out.top.append((list(top.token_ids), list(top.logprobs)))
        if len(r.out.tokens) >= r.max_tokens:
            self._finish(r)
        elif len(r.out.tokens) in r.preempt_at:
            self._preempt(r)

    def _finish(self, r: _Request) -> None:
        del self.requests[r.request_id]
        self.finished[r.request_id] = r
        self.forget.append(r.request_id)
        if not r.keep_blocks:
            self._free(r)

    def _preempt(self, r: _Request) -> None:
        """Forgotten in the next plan and, in that same plan, sent again whole (recompute)."""
        self.forget.append(r.request_id)
        self._free(r)
        r.num_computed = r.sent_blocks = 0
        r.sent = False

    def _free(self, r: _Request) -> None:
        # Blocks shared with a prefix donor stay with the donor.
        self.free.extend(r.blocks[r.num_cached // self.block_size:])
        r.blocks = []
        r.num_cached = 0
