"""Preemption by recompute under a tiny block pool."""

import pytest

from pagedserve.scheduler.scheduler import Scheduler
from tests.scheduler.sched_fakes import (
    GREEDY,
    FakeExecutor,
    Outcome,
    assert_all_free,
    collect,
    make,
    run,
)


def workload(sched: Scheduler) -> None:
    for i in range(5):
        sched.add_request(f"r{i}", [i + 1, 2, 3, 4, 5, 6][: 3 + i], GREEDY, max_tokens=18 - i)


@pytest.mark.parametrize("caching", [True, False])
def test_preempted_requests_finish_with_the_unconstrained_outputs(caching: bool) -> None:
    free_sched, _ = make(block_size=4, num_blocks=256, max_model_len=32)
    workload(free_sched)
    expected = run(free_sched)
    assert free_sched.stats().num_preemptions == 0

    sched, fake = make(block_size=4, num_blocks=8, max_model_len=32,
                       enable_prefix_caching=caching)
    workload(sched)
    got = run(sched)
    assert sched.stats().num_preemptions > 0
    assert got.tokens == expected.tokens
    assert got.reasons == expected.reasons
    assert_all_free(sched)
    assert not fake.state


def first_preemption(sched: Scheduler, fake: FakeExecutor, outcome: Outcome | None = None) -> str:
    while sched.stats().num_preemptions == 0:
        collect(outcome or Outcome(), sched.step())
    return fake.records[-1].forget_ids[0]


def test_the_newest_running_request_is_preempted_and_resumed_first() -> None:
    sched, fake = make(block_size=4, num_blocks=6, max_model_len=24, enable_prefix_caching=False)
    sched.add_request("old", [1, 2, 3, 4], GREEDY, max_tokens=16)
    sched.add_request("new", [5, 6, 7, 8], GREEDY, max_tokens=16)
    sched.add_request("later", [9], GREEDY, max_tokens=2)
    assert first_preemption(sched, fake) == "new"
    assert [r.request_id for r in sched.waiting][:1] == ["new"]  # front of the queue
    req = sched.requests["new"]
    assert req.block_ids == [] and req.num_computed_tokens == 0
    outputs_so_far = list(req.output_token_ids)
    assert outputs_so_far
    # when it comes back, it is a NewRequest carrying its prompt and outputs so far
    while True:
        plan = sched.schedule()
        news = [n for n in plan.new_requests if n.request_id == "new"]
        sched.apply_result(fake.execute(plan))
        if news:
            break
    (resumed,) = news
    assert list(resumed.prompt_token_ids) == [5, 6, 7, 8]
    assert list(resumed.output_token_ids) == outputs_so_far
    run(sched)
    assert_all_free(sched)


def test_preempted_blocks_stay_findable_in_the_prefix_cache() -> None:
    sched, fake = make(block_size=4, num_blocks=6, max_model_len=24)
    sched.add_request("old", [1, 2, 3, 4, 5, 6, 7, 8], GREEDY, max_tokens=7)
    sched.add_request("new", [9, 10, 11, 12, 13, 14, 15, 16], GREEDY, max_tokens=16)
    out = Outcome()
    assert first_preemption(sched, fake, out) == "new"
    run(sched, outcome=out)
    assert len(out.tokens["new"]) == 16
    # the resumed request found at least its prompt's two blocks again
    assert sched.stats().prefix_cache_hits >= 8
    assert_all_free(sched)


def test_a_request_alone_never_preempts_itself_forever() -> None:
    sched, _ = make(block_size=4, num_blocks=4, max_model_len=16)
    sched.add_request("a", [1, 2, 3], GREEDY, max_tokens=20)
    out = run(sched)
    assert out.reasons["a"] == "length" and len(out.tokens["a"]) == 13
    assert sched.stats().num_preemptions == 0
