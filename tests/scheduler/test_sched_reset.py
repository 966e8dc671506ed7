"""reset_executor_state(): a restarted executor is refilled by recompute, losing no request."""

from tests.scheduler.sched_fakes import GREEDY, Outcome, assert_all_free, collect, make, run


def workload(sched: object) -> None:
    for i in range(4):
        sched.add_request(f"r{i}", list(range(1, 10 + 3 * i)), GREEDY,  # type: ignore[attr-defined]
                          max_tokens=12)


def test_reset_loses_no_request_and_gives_the_same_outputs() -> None:
    ref, _ = make(block_size=4, num_blocks=64, max_model_len=64, max_num_batched_tokens=16)
    workload(ref)
    expected = run(ref)

    sched, fake = make(block_size=4, num_blocks=64, max_model_len=64, max_num_batched_tokens=16)
    workload(sched)
    out = Outcome()
    for restart_at in (3, 4, 9):
        while fake.last_step_id < restart_at:
            collect(out, sched.step())
        fake.restart()
        sched.reset_executor_state()
        assert sched.stats().blocks_cached == 0
        assert sched.stats().num_running == 0
        assert_all_free(sched)
    run(sched, outcome=out)
    assert out.tokens == expected.tokens
    assert out.reasons == expected.reasons
    assert_all_free(sched)


def test_reset_with_a_step_in_flight() -> None:
    """The executor died during execute: the scheduled step never gets its result."""
    ref, _ = make()
    workload(ref)
    expected = run(ref)

    sched, fake = make()
    workload(sched)
    out = Outcome()
    collect(out, sched.step())
    collect(out, sched.step())
    sched.schedule()  # lost with the executor
    fake.restart()
    sched.reset_executor_state()
    run(sched, outcome=out)
    assert out.tokens == expected.tokens
    assert_all_free(sched)


def test_reset_keeps_waiting_order() -> None:
    sched, fake = make(block_size=4, max_num_seqs=2)
    workload(sched)
    sched.step()
    fake.restart()
    sched.reset_executor_state()
    assert [r.request_id for r in sched.waiting] == ["r0", "r1", "r2", "r3"]
