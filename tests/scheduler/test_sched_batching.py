"""Continuous batching: budgets, chunked prompts, and the shape of plans."""

import pytest

from pagedserve.protos import executor_pb2
from tests.scheduler.sched_fakes import GREEDY, assert_all_free, make, run


def test_a_request_runs_to_max_tokens() -> None:
    sched, fake = make()
    sched.add_request("a", [1, 2, 3, 4, 5], GREEDY, max_tokens=4)
    out = run(sched)
    assert len(out.tokens["a"]) == 4 and out.reasons["a"] == "length"
    expected = [fake.token_for("a", i, 5 + i) for i in range(4)]
    assert out.tokens["a"] == expected
    assert_all_free(sched)
    assert not sched.has_unfinished()


def test_plans_send_full_data_once_then_diffs() -> None:
    sched, _ = make(block_size=4)
    sched.add_request("a", list(range(1, 7)), GREEDY, max_tokens=5)
    plan = sched.schedule()
    (new,) = plan.new_requests
    assert new.request_id == "a" and list(new.prompt_token_ids) == list(range(1, 7))
    assert len(new.block_ids) == 2 and new.num_computed_tokens == 0
    assert new.num_scheduled_tokens == 6
    sched.apply_result(executor_pb2.StepResult(step_id=plan.step_id, outputs=[
        executor_pb2.RequestOutput(request_id="a", token_ids=[50])]))
    plan = sched.schedule()
    assert not plan.new_requests
    (cont,) = plan.continuing_requests
    assert cont.num_scheduled_tokens == 1 and list(cont.new_block_ids) == []
    sched.apply_result(executor_pb2.StepResult(step_id=plan.step_id, outputs=[
        executor_pb2.RequestOutput(request_id="a", token_ids=[51])]))
    plan = sched.schedule()  # computes token 8: still in block 1
    assert list(plan.continuing_requests[0].new_block_ids) == []
    sched.apply_result(executor_pb2.StepResult(step_id=plan.step_id, outputs=[
        executor_pb2.RequestOutput(request_id="a", token_ids=[52])]))
    plan = sched.schedule()  # computes token 9: needs block 2
    assert len(plan.continuing_requests[0].new_block_ids) == 1


def test_long_prompt_is_chunked_and_samples_only_at_its_end() -> None:
    sched, fake = make(block_size=4, num_blocks=64, max_model_len=128, max_num_batched_tokens=16)
    sched.add_request("long", list(range(1, 51)), GREEDY, max_tokens=2)
    chunks = []
    for _ in range(3):
        deltas = sched.step()
        assert deltas == []  # mid-prompt chunks yield no token
        chunks.append(fake.records[-1].num_tokens)
    deltas = sched.step()
    chunks.append(fake.records[-1].num_tokens)
    assert chunks == [16, 16, 16, 2]
    assert len(deltas) == 1 and len(deltas[0].new_token_ids) == 1
    run(sched)
    assert_all_free(sched)


@pytest.mark.parametrize("budget,max_seqs,binds", [(8, 3, True), (32, 2, True), (5, 16, False)])
def test_budgets_hold_every_step(budget: int, max_seqs: int, binds: bool) -> None:
    sched, fake = make(block_size=4, num_blocks=128, max_model_len=64,
                       max_num_batched_tokens=budget, max_num_seqs=max_seqs)
    for i in range(10):
        sched.add_request(f"r{i}", [i + 1] * (3 + 4 * i), GREEDY, max_tokens=3 + i % 4)
    out = run(sched)
    assert len(out.reasons) == 10
    for rec in fake.records:
        assert rec.num_tokens <= budget
        assert rec.num_seqs <= max_seqs
    assert (max(rec.num_seqs for rec in fake.records) == max_seqs) == binds
    assert (max(rec.num_tokens for rec in fake.records) == budget)
    assert_all_free(sched)


def test_running_requests_go_first_then_arrival_order() -> None:
    sched, fake = make(block_size=4, max_num_batched_tokens=10, enable_prefix_caching=False)
    sched.add_request("a", [1] * 8, GREEDY, max_tokens=3)
    sched.add_request("b", [2] * 8, GREEDY, max_tokens=3)
    sched.add_request("c", [3] * 8, GREEDY, max_tokens=3)
    sched.step()
    assert fake.records[-1].new_ids == ["a", "b"]  # b got a 2-token chunk
    plan = sched.schedule()
    got = [(c.request_id, c.num_scheduled_tokens) for c in plan.continuing_requests]
    assert got == [("a", 1), ("b", 6)]
    assert [n.request_id for n in plan.new_requests] == ["c"]
    assert plan.new_requests[0].num_scheduled_tokens == 3


def test_apply_result_checks_the_contract() -> None:
    sched, _ = make()
    sched.add_request("a", [1, 2, 3], GREEDY, max_tokens=3)
    with pytest.raises(RuntimeError):
        sched.apply_result(executor_pb2.StepResult())
    plan = sched.schedule()
    with pytest.raises(RuntimeError):
        sched.schedule()
    with pytest.raises(RuntimeError, match="omitted"):
        sched.apply_result(executor_pb2.StepResult(step_id=plan.step_id))


def test_logprobs_reach_the_delta() -> None:
    sched, _ = make()
    sampling = executor_pb2.SamplingParams(logprobs=2)
    sched.add_request("a", [1, 2, 3], sampling, max_tokens=2)
    sched.add_request("b", [1, 2, 3], GREEDY, max_tokens=2)
    out = run(sched)
    a = [d for d in out.deltas if d.request_id == "a"]
    assert sum(len(d.new_token_ids) for d in a) == 2
    for d in a:  # the fake executor's values for each token (sched_fakes._add_logprobs)
        assert d.new_logprobs == pytest.approx([-(t % 7) / 10 for t in d.new_token_ids])
        assert [list(top.token_ids) for top in d.new_top_logprobs] == [
            [t, (t + 1) % 1000] for t in d.new_token_ids]
        assert all(list(top.logprobs) == pytest.approx([0.0, -0.1]) for top in d.new_top_logprobs)
    b = [d for d in out.deltas if d.request_id == "b"]
    assert all(d.new_logprobs is None and d.new_top_logprobs is None for d in b)
    assert all(d.num_prompt_tokens == 3 for d in out.deltas)


@pytest.mark.parametrize("kwargs,field", [
    ({"prompt_token_ids": []}, "prompt_token_ids"),
    ({"prompt_token_ids": [1] * 129}, "max_model_len"),
    ({"prompt_token_ids": [-1]}, "prompt_token_ids"),
    ({"max_tokens": -1}, "max_tokens"),  # 0 means what the context leaves
    ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
    ({"stop_token_ids": [-3]}, "stop_token_ids"),
    ({"n": 0}, "n"),
    ({"request_id": ""}, "request_id"),
])
def test_add_request_validation(kwargs: dict, field: str) -> None:
    sched, _ = make(max_model_len=128)
    args = {"request_id": "x", "prompt_token_ids": [1, 2], "sampling": GREEDY, "max_tokens": 4}
    args.update(kwargs)
    with pytest.raises(ValueError, match=field):
        sched.add_request(**args)
    assert not sched.has_unfinished()


def test_duplicate_ids_are_rejected() -> None:
    sched, _ = make()
    sched.add_request("x", [1], GREEDY, max_tokens=2)
    with pytest.raises(ValueError, match="request_id"):
        sched.add_request("x", [1], GREEDY, max_tokens=2)
    sched.add_request("y", [1], GREEDY, max_tokens=2, n=2)
    with pytest.raises(ValueError, match="y-1"):
        sched.add_request("y-1", [1], GREEDY, max_tokens=2)
    run(sched)
    sched.add_request("x", [1], GREEDY, max_tokens=2)  # a finished id may be used again
