"""Every gRPC method of the router, the scheduler and the executor, fuzzed with messages that
parse (tests/fuzz/grpc_fuzz.py): no call ends INTERNAL, UNKNOWN, UNAVAILABLE or past its deadline,
and afterwards each server answers a real request exactly as before the fuzz and holds nothing
back (no request running or waiting, every KV block free). A short run for CI; the long one is
`python -m tests.fuzz.grpc_fuzz ADDRESS SERVICE --count 10000`."""

from __future__ import annotations

import random

import grpc
import pytest

from pagedserve.protos import executor_pb2, executor_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from tests.fuzz.grpc_fuzz import SERVICES, bad, fuzz
from tests.services.test_grpc_junk_bodies import generate_through_scheduler
from tests.waiting import wait_until

COUNT = 150  # calls per server

pytestmark = pytest.mark.timeout(600)


def _idle(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        s = scheduler_pb2_grpc.SchedulerStub(channel).Stats(scheduler_pb2.StatsRequest(),
                                                            timeout=10)
    return s.num_running == s.num_waiting == 0 and s.blocks_free == s.blocks_total > 0


def _probe(address: str) -> list[list[int]]:
    """A fixed two-step plan on a fresh Execute stream: the tokens it samples."""
    plans = [executor_pb2.StepPlan(step_id=0, new_requests=[executor_pb2.NewRequest(
                 request_id="probe", prompt_token_ids=[21, 22, 23, 24], block_ids=[0],
                 num_scheduled_tokens=4)]),
             executor_pb2.StepPlan(step_id=1, continuing_requests=[
                 executor_pb2.ContinuingRequest(request_id="probe", num_scheduled_tokens=1)])]
    with grpc.insecure_channel(address) as channel:
        results = executor_pb2_grpc.ExecutorStub(channel).Execute(iter(plans), timeout=60)
        return [list(o.token_ids) for r in results for o in r.outputs]


@pytest.mark.parametrize("name, service", [("router", "generation"),
                                           ("scheduler", "scheduler")])
def test_fuzzed_front_services_answer_as_before_and_hold_nothing(served: dict, name: str,
                                                                 service: str) -> None:
    scheduler_address = served["scheduler"][0]
    before = generate_through_scheduler(scheduler_address)
    with grpc.insecure_channel(served[name][0]) as channel:
        statuses = fuzz(channel, SERVICES[service], COUNT, random.Random(23))
    assert not bad(statuses), statuses
    assert sum(statuses.values()) == COUNT
    wait_until(lambda: _idle(scheduler_address), timeout=60,
               what="the fuzzed requests to finish and free their blocks")
    assert generate_through_scheduler(scheduler_address) == before
    assert served[name][1].proc.poll() is None


def test_fuzzed_executor_answers_as_before(served: dict) -> None:
    executor_address, scheduler_address = served["executor"][0], served["scheduler"][0]
    expected = generate_through_scheduler(scheduler_address)
    probe = _probe(executor_address)
    with grpc.insecure_channel(executor_address) as channel:
        statuses = fuzz(channel, SERVICES["executor"], COUNT, random.Random(29))
    assert not bad(statuses), statuses
    assert _probe(executor_address) == probe
    # the scheduler lost its Execute stream to the fuzz's; it reconnects and recomputes
    wait_until(lambda: _idle(scheduler_address), timeout=60, what="the scheduler idle")
    assert generate_through_scheduler(scheduler_address) == expected


@pytest.mark.parametrize("field, bad", [
    ("output_token_ids", scheduler_pb2.ScheduleRequest(output_token_ids=[916, 4096])),
    ("prompt_token_ids", scheduler_pb2.ScheduleRequest(prompt_token_ids=[99_999])),
    ("stop_token_ids", scheduler_pb2.ScheduleRequest(stop_token_ids=[99_999])),
    ("sampling.logit_bias", scheduler_pb2.ScheduleRequest(
        sampling=executor_pb2.SamplingParams(logit_bias={99_999: 1.0}))),
])
def test_a_request_the_executor_would_refuse_is_refused_alone(served: dict, field: str,
                                                              bad) -> None:
    """Found by the fuzz: ids outside the vocabulary passed the scheduler, and every plan that
    carried the request was refused by the executor, for ever (the scheduler took each refusal
    for a lost executor and resent it). Now the scheduler refuses it, naming the field."""
    scheduler_address = served["scheduler"][0]
    request = scheduler_pb2.ScheduleRequest(request_id=f"bad-{field}", prompt_token_ids=[64],
                                            max_tokens=8)
    request.MergeFrom(bad)
    with grpc.insecure_channel(scheduler_address) as channel, \
            pytest.raises(grpc.RpcError) as refused:
        list(scheduler_pb2_grpc.SchedulerStub(channel).Generate(request, timeout=30))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in refused.value.details()
    assert len(generate_through_scheduler(scheduler_address)) == 2


def test_a_request_only_the_executor_refuses_is_aborted_alone(llama_dir, tmp_path) -> None:
    """Defence in depth behind the scheduler's checks: the executor names the request it ended a
    plan's stream over (trailing metadata), and the scheduler aborts that request instead of
    resending it with every later plan; the others are recomputed and complete. Here: a
    constrained request on a model directory with no tokenizer to build its grammar from."""
    from tests.services.conftest import executor_and_scheduler

    bare = tmp_path / "no-tokenizer"
    bare.mkdir()
    for f in llama_dir.iterdir():
        if not f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            (bare / f.name).symlink_to(f)
    sock = tmp_path / "s"
    sock.mkdir()
    with executor_and_scheduler(bare, sock) as _:
        address = f"unix://{sock}/scheduler.sock"
        constrained = scheduler_pb2.ScheduleRequest(
            request_id="constrained", prompt_token_ids=[64, 65], max_tokens=8,
            sampling=executor_pb2.SamplingParams(
                structured=executor_pb2.StructuredOutput(grammar='start: "a"')))
        with grpc.insecure_channel(address) as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            outs = list(stub.Generate(constrained, timeout=60))
            assert outs and outs[-1].finished and outs[-1].finish_reason == "abort"
            assert not [t for o in outs for t in o.token_ids]
        assert len(generate_through_scheduler(address)) == 2
