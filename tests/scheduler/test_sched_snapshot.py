"""The dashboard's snapshot of the page table and the queues, against what the test itself set up:
which blocks two requests with a common prompt prefix share, which each holds alone, which stay
cached once they finish; and each step's split between prompt and decode tokens."""

from __future__ import annotations

from pagedserve.scheduler.snapshot import CACHED, FREE, HELD, SHARED, UNLISTED_OWNER, snapshot
from pagedserve.scheduler.step_history import StepHistory, prefill_decode_split
from tests.scheduler.sched_fakes import GREEDY, make, run


def _step(sched, fake) -> tuple[int, int]:
    plan = sched.schedule()
    split = prefill_decode_split(sched, plan)
    sched.apply_result(fake.execute(plan))
    return split


def test_shared_prefix_blocks_are_shared_and_finished_ones_stay_cached() -> None:
    sched, fake = make(block_size=4, num_blocks=32)
    prefix = list(range(100, 108))  # two full blocks
    sched.add_request("a", [*prefix, 1, 2, 3], GREEDY, max_tokens=6)
    _step(sched, fake)  # a's prompt computed: its two full blocks are now cached by hash
    sched.add_request("b", [*prefix, 7, 8], GREEDY, max_tokens=6)
    _step(sched, fake)  # b admitted on a prefix hit of those two blocks
    snap = snapshot(sched, StepHistory())
    a, b = sched.requests["a"], sched.requests["b"]
    assert a.block_ids[:2] == b.block_ids[:2]
    assert [e.request_id for e in snap.requests] == ["a", "b"]
    assert [e.state for e in snap.requests] == ["running", "running"]
    assert snap.requests[1].cached_tokens == 8
    for i in range(32):
        want = (SHARED if i in a.block_ids[:2] else HELD if i in a.block_ids + b.block_ids
                else FREE)
        assert snap.block_states[i] == want, i
        assert snap.block_ref_counts[i] == {SHARED: 2, HELD: 1, FREE: 0}[want]
    assert {snap.block_owners[i] for i in a.block_ids[2:]} == {1}
    assert {snap.block_owners[i] for i in b.block_ids[2:]} == {2}
    held = set(a.block_ids) | set(b.block_ids)
    assert not any(snap.block_owners[i] for i in range(32) if i not in held)

    run(sched)
    after = snapshot(sched, StepHistory())
    assert not after.requests and after.num_running == 0
    assert HELD not in after.block_states and SHARED not in after.block_states
    assert after.block_states.count(CACHED) == len(sched.kv.pool.cached) >= 2
    assert after.prefix_cache_hits == 8


def test_unlisted_requests_own_blocks_as_other_and_waiting_ones_are_listed_after() -> None:
    sched, fake = make(block_size=4, num_blocks=8, max_model_len=32, max_num_seqs=2)
    for rid in "abc":
        sched.add_request(rid, [ord(rid)] * 5, GREEDY, max_tokens=3)
    while len(sched.running) < 2:
        _step(sched, fake)
    snap = snapshot(sched, StepHistory(), max_requests=1)
    assert [(e.request_id, e.state) for e in snap.requests] == [("a", "running")]
    assert (snap.num_running, snap.num_waiting) == (2, 1)
    b = sched.requests["b"]
    assert {snap.block_owners[i] for i in b.block_ids} == {UNLISTED_OWNER}
    full = snapshot(sched, StepHistory())
    assert [(e.request_id, e.state) for e in full.requests] == [
        ("a", "running"), ("b", "running"), ("c", "waiting")]


def test_a_chunked_prompt_counts_as_prefill_then_each_token_as_decode() -> None:
    sched, fake = make(block_size=4, num_blocks=32, max_num_batched_tokens=4)
    sched.add_request("a", list(range(10)), GREEDY, max_tokens=3)
    splits = [_step(sched, fake) for _ in range(5)]
    # 10 prompt tokens in chunks of 4, 4, 2 (the last chunk samples the first output), then
    # one decode token per step for the two further outputs
    assert splits == [(4, 0), (4, 0), (2, 0), (0, 1), (0, 1)]
    history = StepHistory(size=2)
    for i in range(3):
        history.record(seconds=0.1, prefill=i, decode=1, outputs=1, requests=1)
    assert [s.prefill_tokens for s in history.samples] == [1, 2]
