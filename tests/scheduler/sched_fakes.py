"""A fake executor that keeps per-request state exactly as the step contract says, and checks it.

It models the KV cache: each slot of each block holds a digest of the whole token prefix up to that
position. Computing a token first reads every earlier slot through the block table (attention) and
asserts it holds the right digest, then writes its own slot, asserting no other live request holds
that block (shared blocks are read-only full prefix blocks). So a stale, evicted, prematurely reused
or wrongly shared block fails the test. Sampled tokens depend only on (request id, position), or on a
per-request script, never on batching, preemption or restarts.
"""

from __future__ import annotations

import zlib
from collections import Counter
from dataclasses import dataclass, field

from pagedserve.protos import executor_pb2
from pagedserve.scheduler.config import SchedulerConfig
from pagedserve.scheduler.driver import StepDriver
from pagedserve.scheduler.outputs import RequestOutputDelta
from pagedserve.scheduler.scheduler import Scheduler


@dataclass
class FakeRequest:
    tokens: list[int]
    prompt_len: int
    blocks: list[int]
    computed: int
    sampling: executor_pb2.SamplingParams
    digests: list[int] = field(default_factory=list)

    def digest(self, pos: int) -> int:
        while len(self.digests) <= pos:
            i = len(self.digests)
            prev = self.digests[-1] if self.digests else 0
            self.digests.append(hash((prev, self.tokens[i])))
        return self.digests[pos]


@dataclass
class StepRecord:
    step_id: int
    num_seqs: int
    num_tokens: int
    new_ids: list[str]
    forget_ids: list[str]


class FakeExecutor:
    def __init__(self, *, block_size: int, num_blocks: int, max_model_len: int,
                 vocab_size: int = 1000, eos_token_ids: tuple[int, ...] = (),
                 scripts: dict[str, list[int]] | None = None) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.scripts = scripts or {}
        self.state: dict[str, FakeRequest] = {}
        self.kv: list[list[int | None]] = [[None] * block_size for _ in range(num_blocks)]
        self.records: list[StepRecord] = []
        self.last_step_id = -1

    def describe(self) -> executor_pb2.DescribeResponse:
        return executor_pb2.DescribeResponse(
            model="fake", vocab_size=self.vocab_size, max_model_len=self.max_model_len,
            eos_token_ids=self.eos_token_ids, block_size=self.block_size,
            num_kv_blocks=self.num_blocks, device="cpu")

    def restart(self) -> None:
        """A fresh process: no request state, garbage in the KV cache."""
        self.state.clear()
        self.kv = [[None] * self.block_size for _ in range(self.num_blocks)]

    def token_for(self, request_id: str, output_index: int, position: int) -> int:
        script = self.scripts.get(request_id)
        if script is not None and output_index < len(script):
            return script[output_index]
        return zlib.crc32(f"{request_id}:{position}".encode()) % self.vocab_size

    def execute(self, plan: executor_pb2.StepPlan) -> executor_pb2.StepResult:
        assert plan.step_id > self.last_step_id, "step ids must increase"
        self.last_step_id = plan.step_id
        for rid in plan.forget_request_ids:
            assert rid in self.state, f"forget of unknown {rid}"
            del self.state[rid]
        scheduled = self._take_requests(plan)
        self._check_block_tables()
        result = executor_pb2.StepResult(step_id=plan.step_id)
        holders = Counter(b for r in self.state.values() for b in r.blocks)
        for rid, n in scheduled.items():
            token = self._compute(rid, self.state[rid], n, holders)
            if token is not None:
                out = result.outputs.add(request_id=rid, token_ids=[token])
                self._add_logprobs(out, self.state[rid].sampling, token)
        self.records.append(StepRecord(plan.step_id, len(scheduled), sum(scheduled.values()),
                                       [r.request_id for r in plan.new_requests],
                                       list(plan.forget_request_ids)))
        return result

    def _take_requests(self, plan: executor_pb2.StepPlan) -> dict[str, int]:
        scheduled: dict[str, int] = {}
        for new in plan.new_requests:
            assert new.request_id not in self.state, f"{new.request_id} is new but known"
            tokens = [*new.prompt_token_ids, *new.output_token_ids]
            assert 0 <= new.num_computed_tokens < len(tokens)
            self.state[new.request_id] = FakeRequest(
                tokens, len(new.prompt_token_ids), list(new.block_ids), new.num_computed_tokens,
                new.sampling)
            scheduled[new.request_id] = new.num_scheduled_tokens
        for cont in plan.continuing_requests:
            assert cont.request_id in self.state, f"{cont.request_id} continues but is unknown"
            assert cont.request_id not in scheduled, f"{cont.request_id} twice in one plan"
            self.state[cont.request_id].blocks.extend(cont.new_block_ids)
            scheduled[cont.request_id] = cont.num_scheduled_tokens
        return scheduled

    def _check_block_tables(self) -> None:
        for rid, req in self.state.items():
            assert len(set(req.blocks)) == len(req.blocks), f"{rid} holds a block twice"
            assert all(0 <= b < self.num_blocks for b in req.blocks), f"{rid}: bad block id"
            assert len(req.blocks) * self.block_size >= req.computed

    def _compute(self, rid: str, req: FakeRequest, n: int, holders: Counter[int]) -> int | None:
        bs = self.block_size
        assert n > 0, f"{rid} scheduled {n} tokens"
        end = req.computed + n
        assert end <= len(req.tokens), f"{rid} computes past what it holds"
        assert len(req.blocks) * bs >= end, f"{rid}: block table too short for {end} tokens"
        for pos in range(req.computed):
            got = self.kv[req.blocks[pos // bs]][pos % bs]
            assert got == req.digest(pos), f"{rid}: wrong KV at position {pos}"
        for pos in range(req.computed, end):
            block = req.blocks[pos // bs]
            assert holders[block] == 1, f"{rid} writes block {block} that another request holds"
            self.kv[block][pos % bs] = req.digest(pos)
        req.computed = end
        if end < len(req.tokens):
            return None
        token = self.token_for(rid, len(req.tokens) - req.prompt_len, len(req.tokens))
        req.tokens.append(token)
        return token

    def _add_logprobs(self, out: executor_pb2.RequestOutput,
                      sampling: executor_pb2.SamplingParams, token: int) -> None:
        if not sampling.HasField("logprobs"):
            return
        out.logprobs.append(-(token % 7) / 10)
        k = sampling.logprobs
        out.top_logprobs.add(token_ids=[(token + i) % self.vocab_size for i in range(k)],
                             logprobs=[-i / 10 for i in range(k)])


GREEDY = executor_pb2.SamplingParams(temperature=0.0, top_p=1.0)


class DrivenScheduler(Scheduler):
    """A Scheduler with the executor the tests step it with: step() is StepDriver's step (the
    engine's Scheduler holds no executor; the tests' loops are shorter with one at hand)."""

    def __init__(self, config: SchedulerConfig, executor: FakeExecutor) -> None:
        super().__init__(config)
        self._driver = StepDriver(self, executor)

    def step(self) -> list[RequestOutputDelta]:
        return self._driver.step()


def make(*, block_size: int = 4, num_blocks: int = 64, max_model_len: int = 128,
         scripts: dict[str, list[int]] | None = None, vocab_size: int = 1000,
         **config: object) -> tuple[DrivenScheduler, FakeExecutor]:
    fake = FakeExecutor(block_size=block_size, num_blocks=num_blocks, max_model_len=max_model_len,
                        vocab_size=vocab_size, scripts=scripts)
    cfg = SchedulerConfig(block_size=block_size, num_kv_blocks=num_blocks,
                          max_model_len=max_model_len, **config)  # type: ignore[arg-type]
    return DrivenScheduler(cfg, fake), fake


def check_invariants(sched: Scheduler) -> None:
    """Reference counts equal holders; the free queue is exactly the unreferenced blocks."""
    pool = sched.kv.pool
    holders = Counter(b for r in sched.running for b in r.block_ids)
    for block in pool.blocks:
        assert block.ref_count >= 0
        assert block.ref_count == holders[block.block_id], f"{block} held {holders[block.block_id]}"
    free = [b.block_id for b in pool.free_queue]
    assert sorted(free) == [b.block_id for b in pool.blocks if b.ref_count == 0]
    for h, block in pool.cached.items():
        assert block.block_hash == h
    assert all(not r.block_ids for r in sched.waiting)
    assert {r.request_id for r in (*sched.running, *sched.waiting)} == set(sched.requests)
    assert len(sched.running) <= sched.config.max_num_seqs


@dataclass
class Outcome:
    tokens: dict[str, list[int]] = field(default_factory=dict)
    reasons: dict[str, str | None] = field(default_factory=dict)
    cached: dict[str, int] = field(default_factory=dict)
    deltas: list[RequestOutputDelta] = field(default_factory=list)
    ahead: int = 0  # plans made by schedule_ahead (sched_workload's async runs)


def collect(outcome: Outcome, deltas: list[RequestOutputDelta]) -> None:
    for d in deltas:
        assert d.request_id not in outcome.reasons, f"delta for finished {d.request_id}"
        outcome.tokens.setdefault(d.request_id, []).extend(d.new_token_ids)
        outcome.cached[d.request_id] = d.num_cached_tokens
        outcome.deltas.append(d)
        if d.finished:
            outcome.reasons[d.request_id] = d.finish_reason


def run(sched: Scheduler, max_steps: int = 10_000, outcome: Outcome | None = None) -> Outcome:
    outcome = outcome or Outcome()
    for _ in range(max_steps):
        if not sched.has_unfinished():
            break
        collect(outcome, sched.step())
        check_invariants(sched)
    else:
        raise AssertionError("requests did not finish")
    collect(outcome, sched.step())  # pending abort deltas, if any
    return outcome


def assert_all_free(sched: Scheduler) -> None:
    stats = sched.stats()
    assert stats.blocks_free == stats.blocks_total
    assert stats.blocks_in_use == 0
    assert all(b.ref_count == 0 for b in sched.kv.pool.blocks)
