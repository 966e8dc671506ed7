"""The scheduler's half of draft-model speculation: it reserves slots and asks the executor for a
number of drafts (it does not know their tokens), then reads the answer as for prompt lookup."""

from __future__ import annotations

import pytest

from pagedserve.protos import executor_pb2
from pagedserve.scheduler.config import SchedulerConfig
from pagedserve.scheduler.scheduler import Scheduler
from pagedserve.scheduler.speculation import EXECUTOR_DRAFT
from pagedserve.scheduler.speculative_config import SpeculativeConfig

K = 3


def scheduler(max_tokens_room: int = 64) -> Scheduler:
    spec = SpeculativeConfig(method="draft_model", model="draft", num_speculative_tokens=K)
    return Scheduler(SchedulerConfig(block_size=8, num_kv_blocks=32, max_model_len=max_tokens_room,
                                     speculative=spec))


def decoding(sched: Scheduler, max_tokens: int = 20) -> None:
    """One request past its prompt step: it holds one output token, not yet computed."""
    sched.add_request("r", [5, 6, 7, 8], executor_pb2.SamplingParams(), max_tokens=max_tokens)
    plan = sched.schedule()
    assert not plan.continuing_requests
    sched.apply_result(executor_pb2.StepResult(step_id=plan.step_id, outputs=[
        executor_pb2.RequestOutput(request_id="r", token_ids=[9])]))


def test_the_plan_asks_for_a_number_of_drafts_and_reserves_their_slots() -> None:
    sched = scheduler()
    decoding(sched)
    plan = sched.schedule()
    (cont,) = plan.continuing_requests
    assert (cont.num_speculative_tokens, list(cont.draft_token_ids)) == (K, [])
    assert cont.num_scheduled_tokens == 1 + K
    req = sched.requests["r"]
    assert len(req.block_ids) * 8 >= req.num_computed_tokens + K
    # the executor accepted 2 of its 3 drafts and sampled one token more
    sched.apply_result(executor_pb2.StepResult(step_id=plan.step_id, outputs=[
        executor_pb2.RequestOutput(request_id="r", token_ids=[11, 12, 13])]))
    assert req.output_token_ids == [9, 11, 12, 13]
    assert req.num_computed_tokens == 4 + 1 + 2  # prompt, the held token, 2 accepted drafts
    stats = sched.stats()
    assert (stats.spec_draft_tokens, stats.spec_accepted_tokens, stats.spec_verifications) == (
        K, 2, 1)


def test_the_drafts_asked_for_stop_at_max_tokens() -> None:
    sched = scheduler()
    decoding(sched, max_tokens=3)  # 1 output: one draft and one more token reach 3
    (cont,) = sched.schedule().continuing_requests
    assert cont.num_speculative_tokens == 1


def test_more_tokens_than_drafts_plus_one_is_refused() -> None:
    sched = scheduler()
    decoding(sched)
    plan = sched.schedule()
    with pytest.raises(RuntimeError, match="does not answer the drafts"):
        sched.apply_result(executor_pb2.StepResult(step_id=plan.step_id, outputs=[
            executor_pb2.RequestOutput(request_id="r", token_ids=[1] * (K + 2))]))


def test_the_proposer_is_never_asked() -> None:
    sched = scheduler()
    sched.speculator.propose = lambda *a: pytest.fail("a draft_model scheduler proposed")
    decoding(sched)
    req = sched.requests["r"]
    assert sched.speculator.drafts(req, 1, 100, 0, num_running=1) == [EXECUTOR_DRAFT] * K
