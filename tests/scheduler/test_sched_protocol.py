"""The scheduler driven by hand, one plan and one answer at a time: the errors a wrong answer gets,
step ids, counters, what a preempted or reset request looks like, cache salts, seeds of n > 1
children, and prompt-lookup speculation's drafts under a token budget and a short block pool.
Each expectation is worked out in the test from the rules in scheduler/scheduler.py's and
scheduler/speculation.py's docstrings (found missing by mutation testing: docs/testing.md)."""

from __future__ import annotations

import re

import pytest

from pagedserve.protos import executor_pb2
from pagedserve.scheduler.block_pool import Block, BlockPool, FreeBlockQueue
from pagedserve.scheduler.config import SchedulerConfig
from pagedserve.scheduler.request import Request, RequestStatus, StopParams
from pagedserve.scheduler.scheduler import Scheduler
from pagedserve.scheduler.speculative_config import SpeculativeConfig
from pagedserve.scheduler.stop import check_stop
from tests.scheduler.sched_fakes import make, run

P = executor_pb2.SamplingParams


def sched_of(block_size: int = 4, num_kv_blocks: int = 16, max_model_len: int = 32,
             **config: object) -> Scheduler:
    return Scheduler(SchedulerConfig(block_size=block_size, num_kv_blocks=num_kv_blocks,
                                     max_model_len=max_model_len, **config))  # type: ignore[arg-type]


def answer(sched: Scheduler, plan: executor_pb2.StepPlan, tokens: dict[str, list[int]],
           logprobs: dict[str, list[float]] | None = None):
    outputs = [executor_pb2.RequestOutput(request_id=rid, token_ids=t,
                                          logprobs=(logprobs or {}).get(rid, []))
               for rid, t in tokens.items()]
    return sched.apply_result(executor_pb2.StepResult(step_id=plan.step_id, outputs=outputs))


def step(sched: Scheduler, token: int = 9):
    """One step in which every request that computes its last held token samples `token`."""
    plan = sched.schedule()
    ids = [r.request_id for r in plan.new_requests] + [r.request_id for r in
                                                       plan.continuing_requests]
    samples = [rid for rid in ids
               if sched.requests[rid].num_computed_tokens == sched.requests[rid].num_tokens]
    return plan, answer(sched, plan, {rid: [token] for rid in samples})


# ---- the plan / answer protocol ---------------------------------------------------------------


def test_step_ids_count_up_from_zero() -> None:
    sched = sched_of()
    sched.add_request("a", [1, 2, 3], P(), max_tokens=5)
    assert [step(sched)[0].step_id for _ in range(3)] == [0, 1, 2]


def _two_token_prompt_chunked(sched: Scheduler) -> executor_pb2.StepPlan:
    sched.add_request("a", [1, 2, 3, 4, 5, 6], P(), max_tokens=3)
    return sched.schedule()  # a budget of 4: a prompt chunk that does not sample


@pytest.mark.parametrize("case,message", [
    ("apply first", "apply_result() without a scheduled step"),
    ("schedule twice", "schedule() called twice without apply_result()"),
    ("wrong step", "result for step 7, expected 0"),
    ("omitted", "executor omitted a token for 'a' in step 0"),
    ("sent", "executor sent a token for 'a' in step 0"),
    ("unscheduled", "executor sent tokens for unscheduled requests ['zz']"),
    ("empty", "executor sent no token ids for 'a'"),
    ("two tokens", "executor sent 2 tokens for 'a', which had no drafts"),
])
def test_a_wrong_answer_is_refused_naming_the_fault(case: str, message: str) -> None:
    sched = sched_of(max_num_batched_tokens=4)
    with pytest.raises(RuntimeError, match=f"^{re.escape(message)}$"):
        if case == "apply first":
            sched.apply_result(executor_pb2.StepResult(step_id=0))
        elif case == "sent":
            plan = _two_token_prompt_chunked(sched)
            answer(sched, plan, {"a": [9]})
        else:
            sched.add_request("a", [1, 2, 3], P(), max_tokens=3)
            plan = sched.schedule()  # the whole prompt: "a" samples
            if case == "schedule twice":
                sched.schedule()
            elif case == "wrong step":
                sched.apply_result(executor_pb2.StepResult(step_id=7))
            else:
                answer(sched, plan, {"omitted": {}, "unscheduled": {"a": [9], "zz": [9]},
                                     "empty": {"a": []}, "two tokens": {"a": [9, 8]}}[case])


def test_n_children_are_seeded_only_when_the_request_is() -> None:
    sched = sched_of()
    sched.add_request("u", [1, 2], P(temperature=1.0), max_tokens=2, n=2)
    sched.add_request("s", [1, 2], P(temperature=1.0, seed=41), max_tokens=2, n=2)
    new = {r.request_id: r.sampling for r in sched.schedule().new_requests}
    assert not new["u-0"].HasField("seed") and not new["u-1"].HasField("seed")
    assert (new["s-0"].seed, new["s-1"].seed) == (41, 42)
    # Defaults: no min_tokens, no stop ids, EOS honoured.
    assert (new["u-0"].min_tokens, list(new["u-0"].stop_token_ids), new["u-0"].ignore_eos) == (
        0, [], False)


# ---- preemption, counters, reset ---------------------------------------------------------------


def test_a_preempted_request_keeps_the_cached_count_of_its_first_admission() -> None:
    """block_size 2, 4 blocks: a and b (3-token prompts) take 2 blocks each. Step 2: a needs a
    third block, none is free, so b (the newest) is preempted; a takes the block b freed last
    (b's second), and b's first block stays cached. a ends (max_tokens 3); b comes back with a
    2-token hit, but its usage keeps the 0 cached tokens of its first admission."""
    sched = sched_of(block_size=2, num_kv_blocks=4, max_model_len=8)
    sched.add_request("a", [1, 2, 3], P(), max_tokens=3)
    sched.add_request("b", [4, 5, 6], P(), max_tokens=3)
    step(sched)
    step(sched)
    stats = sched.stats()
    assert (stats.num_waiting, stats.num_running, stats.num_preemptions) == (0, 2, 0)
    plan, _ = step(sched)
    assert list(plan.forget_request_ids) == ["b"]
    b = sched.requests["b"]
    assert b.status is RequestStatus.PREEMPTED and b.num_computed_tokens == 0 and not b.block_ids
    assert "a" not in sched.requests  # finished this step
    stats = sched.stats()
    assert (stats.num_waiting, stats.num_running, stats.num_preemptions) == (1, 0, 1)
    plan, deltas = step(sched)
    (new,) = plan.new_requests
    assert (new.request_id, new.num_computed_tokens) == ("b", 2)
    (delta,) = deltas
    assert delta.finished and delta.num_cached_tokens == 0


def test_the_preemption_count_is_the_number_of_requests_sent_again() -> None:
    sched, fake = make(block_size=2, num_blocks=6, max_model_len=12, max_num_batched_tokens=64)
    for i in range(5):
        sched.add_request(f"r{i}", [i + 1, i + 2, i + 3], P(), max_tokens=7)
    run(sched)
    sent = [rid for record in fake.records for rid in record.new_ids]
    resent = len(sent) - len(set(sent))
    assert resent >= 2
    assert sched.stats().num_preemptions == sched.num_preemptions == resent


def test_reset_requeues_running_requests_with_nothing_computed() -> None:
    sched = sched_of()
    sched.add_request("a", [1, 2, 3, 4, 5], P(), max_tokens=4)
    sched.add_request("b", [6, 7, 8, 9, 10], P(), max_tokens=4)
    step(sched)
    step(sched)
    sched.reset_executor_state()
    assert [r.request_id for r in sched.waiting] == ["a", "b"] and not sched.running
    for rid in ("a", "b"):
        req = sched.requests[rid]
        assert req.status is RequestStatus.PREEMPTED
        assert req.num_computed_tokens == 0 and not req.block_ids
    plan = sched.schedule()
    # The prefix cache went with the executor: each is recomputed from its first token.
    assert [(r.request_id, r.num_computed_tokens, len(r.output_token_ids))
            for r in plan.new_requests] == [("a", 0, 2), ("b", 0, 2)]


# ---- the prefix cache: salts and hit counts ----------------------------------------------------


def test_a_cache_salt_separates_prefixes_and_hits_add_up() -> None:
    """block_size 4, 9-token prompts: a finished request leaves 2 full blocks cached; a request
    with the same prompt and salt hits both (8 tokens), one with another salt hits none."""
    sched = sched_of()
    prompt = list(range(10, 19))

    def first_plan(rid: str, **salt: str) -> executor_pb2.NewRequest:
        sched.add_request(rid, prompt, P(), max_tokens=1, **salt)
        plan, _ = step(sched)
        (new,) = plan.new_requests
        return new

    assert first_plan("a", cache_salt="s1").num_computed_tokens == 0
    assert first_plan("b", cache_salt="s2").num_computed_tokens == 0
    assert first_plan("c", cache_salt="s1").num_computed_tokens == 8
    assert first_plan("d").num_computed_tokens == 0  # no salt is a salt of its own
    assert first_plan("e", cache_salt="").num_computed_tokens == 8  # and "" is no salt
    stats = sched.stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (5 * 9, 16)


# ---- speculation: drafts under the budget and the free blocks ----------------------------------


def spec_sched(k: int, *, proposal: list[int] | None = None, **config: object) -> Scheduler:
    spec = SpeculativeConfig(method="ngram", num_speculative_tokens=k,
                             disable_by_batch_size=config.pop("disable_by_batch_size", None))
    cfg = {"block_size": 4, "num_kv_blocks": 16, "max_model_len": 32, **config}
    sched = sched_of(speculative=spec, **cfg)
    # A proposer that always has `room` tokens to offer (7s unless told), so the drafts' length
    # is the room the scheduler gives.
    sched.speculator.propose = lambda tokens, cfg, room: (proposal or [7] * room)[:room]
    return sched


def start(sched: Scheduler, *rids: str, prompt_len: int = 3, max_tokens: int = 20) -> None:
    """Requests past their prompt step: each holds one output, not yet computed."""
    for rid in rids:
        sched.add_request(rid, list(range(1, prompt_len + 1)), P(), max_tokens=max_tokens)
    plan, _ = step(sched)
    assert [r.request_id for r in plan.new_requests] == list(rids)


def test_drafts_are_sent_and_get_their_blocks() -> None:
    sched = spec_sched(3)
    start(sched, "a")  # 3 prompt tokens computed, 1 output held: the first block is full
    plan = sched.schedule()
    (cont,) = plan.continuing_requests
    assert list(cont.draft_token_ids) == [7, 7, 7] and cont.num_speculative_tokens == 0
    assert cont.num_scheduled_tokens == 4
    assert len(cont.new_block_ids) == 1  # positions 3..6 reach into a second block
    assert len(sched.requests["a"].block_ids) == 2


def test_drafts_take_no_more_than_the_budget_left() -> None:
    """Budget 4: a takes its token and 3 drafts, which leaves nothing for b this step; b waits,
    running, and is not preempted for it."""
    sched = spec_sched(3, max_num_batched_tokens=4)
    start(sched, "a", "b", prompt_len=2)
    plan = sched.schedule()
    assert [(c.request_id, c.num_scheduled_tokens) for c in plan.continuing_requests] == [("a", 4)]
    assert sched.requests["b"].status is RequestStatus.RUNNING and sched.num_preemptions == 0


def test_drafts_share_the_budget_in_order() -> None:
    """Budget 6: a takes 1 + 3, b the 2 left (its token and one draft)."""
    sched = spec_sched(3, max_num_batched_tokens=6)
    start(sched, "a", "b")
    plan = sched.schedule()
    assert [(c.request_id, c.num_scheduled_tokens, len(c.draft_token_ids))
            for c in plan.continuing_requests] == [("a", 4, 3), ("b", 2, 1)]


def test_drafts_leave_a_free_block_for_each_running_request_after_them() -> None:
    """block_size 4, 4 blocks: a and b hold one full block each, 2 are free. a may use one free
    block (the other is b's), so 4 drafts; then b may use the last one: 4 drafts too."""
    sched = spec_sched(8, num_kv_blocks=4, max_model_len=16)
    start(sched, "a", "b")
    plan = sched.schedule()
    assert [(c.request_id, len(c.draft_token_ids), len(c.new_block_ids))
            for c in plan.continuing_requests] == [("a", 4, 1), ("b", 4, 1)]


def test_no_drafts_above_the_batch_size_cap() -> None:
    sched = spec_sched(3, disable_by_batch_size=1)
    start(sched, "a", "b")
    plan = sched.schedule()
    assert [len(c.draft_token_ids) for c in plan.continuing_requests] == [0, 0]


def test_accepted_drafts_stop_at_a_stop_token() -> None:
    """Drafts 5, 7, 7 all accepted, one token more: the outputs end at the stop token 7, the
    second, and so do the logprobs reported."""
    sched = spec_sched(3, proposal=[5, 7, 7])
    sched.add_request("a", [1, 2, 3], P(), max_tokens=20, stop_token_ids=[7])
    step(sched)
    plan = sched.schedule()
    (cont,) = plan.continuing_requests
    assert list(cont.draft_token_ids) == [5, 7, 7]
    (delta,) = answer(sched, plan, {"a": [5, 7, 7, 8]}, {"a": [-0.5, -1.0, -1.5, -2.0]})
    assert delta.new_token_ids == [5, 7] and delta.new_logprobs == [-0.5, -1.0]
    assert delta.finished and delta.finish_reason == "stop"


# ---- guards of the block pool and the stop rule --------------------------------------------------


def test_block_pool_guards() -> None:
    with pytest.raises(AssertionError, match=r"^free queue is empty$"):
        FreeBlockQueue([]).popleft()
    pool = BlockPool(2)
    with pytest.raises(AssertionError, match=r"^registering unreferenced Block\(0, ref=0, hash=None\)$"):
        pool.register(pool.blocks[0], b"\x01" * 32)
    (block,) = pool.allocate(1)
    with pytest.raises(AssertionError, match=r"^clear_cache with blocks in use$"):
        pool.clear_cache()
    block.ref_count = 2
    pool.register(block, bytes.fromhex("0123456789abcdef") + b"\x00" * 24)
    assert repr(block) == "Block(0, ref=2, hash=01234567)"
    assert repr(Block(5)) == "Block(5, ref=0, hash=None)"


def test_check_stop_needs_an_output() -> None:
    req = Request("r", [1, 2], P(), StopParams(4, 0, frozenset(), False), 0)
    with pytest.raises(AssertionError, match=r"^check_stop before any output$"):
        check_stop(req, (), 16)
