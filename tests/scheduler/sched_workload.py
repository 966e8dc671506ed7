"""Random workloads: many requests sharing prefixes, arriving, aborted and restarted at random steps.

A workload's surviving requests must finish with exactly the outputs of an unconstrained run, under
any pool size, budget, seat count, caching setting, abort pattern and executor restart.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field

from pagedserve.protos import executor_pb2
from pagedserve.scheduler.config import SchedulerConfig
from pagedserve.scheduler.outputs import RequestOutputDelta
from pagedserve.scheduler.scheduler import Scheduler
from tests.scheduler.sched_fakes import (
    GREEDY,
    DrivenScheduler,
    FakeExecutor,
    Outcome,
    assert_all_free,
    check_invariants,
    collect,
)

EOS = 0
STOP_ID = 1


@dataclass(frozen=True)
class Spec:
    request_id: str
    prompt: list[int]
    max_tokens: int
    min_tokens: int
    n: int
    arrival: int


@dataclass
class Workload:
    block_size: int
    max_model_len: int
    num_blocks: int
    budget: int
    max_num_seqs: int
    caching: bool
    specs: list[Spec]
    aborts: dict[int, list[str]] = field(default_factory=dict)  # step -> ids
    restarts: set[int] = field(default_factory=set)


def random_workload(rng: random.Random) -> Workload:
    block_size = rng.choice([1, 2, 4, 8])
    max_model_len = rng.randint(16, 48)
    min_blocks = -(-max_model_len // block_size)
    prefixes = [[rng.randint(2, 30) for _ in range(rng.randint(0, 20))] for _ in range(3)]
    specs = []
    for i in range(rng.randint(1, 10)):
        prompt = [*rng.choice(prefixes), *(rng.randint(2, 30) for _ in range(rng.randint(1, 8)))]
        prompt = prompt[:max_model_len]
        max_tokens = rng.randint(1, 20)
        specs.append(Spec(f"q{i}", prompt, max_tokens, rng.randint(0, max_tokens),
                          rng.choice([1, 1, 1, 2, 3]), rng.randint(0, 12)))
    ids = [s.request_id if s.n == 1 else f"{s.request_id}-0" for s in specs]
    aborts: dict[int, list[str]] = {}
    for rid in rng.sample(ids, k=rng.randint(0, min(3, len(ids)))):
        aborts.setdefault(rng.randint(0, 30), []).append(rid)
    return Workload(block_size, max_model_len, rng.randint(min_blocks, 2 * min_blocks + 4),
                    rng.randint(1, 40), rng.randint(1, 6), rng.random() < 0.7, specs, aborts,
                    {rng.randint(1, 40) for _ in range(rng.randint(0, 2))})


def make_scheduler(w: Workload, unconstrained: bool) -> tuple[DrivenScheduler, FakeExecutor]:
    num_blocks = 4096 if unconstrained else w.num_blocks
    fake = FakeExecutor(block_size=w.block_size, num_blocks=num_blocks,
                        max_model_len=w.max_model_len, vocab_size=40, eos_token_ids=(EOS,))
    cfg = SchedulerConfig(
        block_size=w.block_size, num_kv_blocks=num_blocks, max_model_len=w.max_model_len,
        max_num_seqs=256 if unconstrained else w.max_num_seqs,
        max_num_batched_tokens=4096 if unconstrained else w.budget,
        enable_prefix_caching=w.caching, eos_token_ids=(EOS,))
    return DrivenScheduler(cfg, fake), fake


def add(sched: Scheduler, s: Spec) -> None:
    sched.add_request(s.request_id, s.prompt, GREEDY, max_tokens=s.max_tokens,
                      min_tokens=s.min_tokens, stop_token_ids=[STOP_ID], n=s.n)


def run_workload(w: Workload, unconstrained: bool = False, ahead: bool = False) -> Outcome:
    """ahead: async scheduling as the step loop runs it, with the executor computing each plan
    the moment it is planned (as far ahead of apply_result as the scheduler lets it get);
    the count of plans made by schedule_ahead is in the outcome's `ahead` field."""
    sched, fake = make_scheduler(w, unconstrained)
    out = Outcome()
    step = 0
    results: deque[executor_pb2.StepResult] = deque()
    pending = sorted(w.specs, key=lambda s: s.arrival)
    while pending or sched.has_unfinished() or results:
        while pending and (unconstrained or pending[0].arrival <= step):
            add(sched, pending.pop(0))
        if not unconstrained:
            for rid in w.aborts.get(step, []):
                sched.abort(rid)
            if step in w.restarts:
                fake.restart()
                sched.reset_executor_state()
                results.clear()  # the results of plans in flight are lost with the executor
        collect(out, _pipelined_step(sched, fake, results, out) if ahead else sched.step())
        check_invariants(sched)
        if not unconstrained:
            for rec in fake.records[-1:]:
                assert rec.num_tokens <= w.budget and rec.num_seqs <= w.max_num_seqs
        step += 1
        assert step < 5000, "workload did not finish"
    collect(out, sched.step())
    assert_all_free(sched)
    assert not fake.state
    return out


def _execute(fake: FakeExecutor, plan: executor_pb2.StepPlan) -> executor_pb2.StepResult:
    if plan.new_requests or plan.continuing_requests or plan.forget_request_ids:
        return fake.execute(plan)
    return executor_pb2.StepResult(step_id=plan.step_id)


def _pipelined_step(sched: Scheduler, fake: FakeExecutor, results: deque, out: Outcome
                    ) -> list[RequestOutputDelta]:
    """One result applied; a plan made (and run) before it when nothing is in flight, and one
    past it when schedule_ahead can."""
    if not results:
        results.append(_execute(fake, sched.schedule()))
    ahead = sched.schedule_ahead()
    if ahead is not None:
        out.ahead += 1
        results.append(_execute(fake, ahead))
    return sched.apply_result(results.popleft())


def check_workload(w: Workload, ahead: bool = False) -> Outcome:
    expected = run_workload(w, unconstrained=True)
    got = run_workload(w, ahead=ahead)
    for rid, reason in got.reasons.items():
        if reason == "abort":
            # an aborted request's tokens are a prefix of what it would have produced
            assert expected.tokens[rid][:len(got.tokens.get(rid, []))] == got.tokens.get(rid, [])
        else:
            assert got.tokens[rid] == expected.tokens[rid], rid
            assert reason == expected.reasons[rid]
    assert set(got.reasons) == set(expected.reasons)
    return got
