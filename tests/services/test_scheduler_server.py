"""The scheduler gRPC server against a real executor server, both processes on unix sockets."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from pagedserve.protos import executor_pb2, scheduler_pb2, scheduler_pb2_grpc
from pagedserve.router.scheduler_session import SchedulerSession
from tests.services.conftest import (
    MAX_MODEL_LEN,
    MAX_TOKENS,
    executor_and_scheduler,
    prompts,
)


@pytest.fixture(scope="module")
def services(llama_dir: Path, sock_dir: Path) -> Iterator[str]:
    with executor_and_scheduler(llama_dir, sock_dir):
        yield f"unix://{sock_dir}/scheduler.sock"


def schedule_request(request_id: str, prompt: list[int], max_tokens: int = MAX_TOKENS,
                     **kw) -> scheduler_pb2.ScheduleRequest:
    return scheduler_pb2.ScheduleRequest(request_id=request_id, prompt_token_ids=prompt,
                                         max_tokens=max_tokens, ignore_eos=True, **kw)


async def collect(stub: scheduler_pb2_grpc.SchedulerStub, request: scheduler_pb2.ScheduleRequest,
                  ) -> tuple[list[int], list[scheduler_pb2.TokenOutput]]:
    outputs = [out async for out in stub.Generate(request, timeout=30)]
    return [t for out in outputs for t in out.token_ids], outputs


def run(address: str, body) -> object:
    """Runs `body(stub)` on a fresh grpc.aio channel, with an overall timeout."""
    async def main() -> object:
        async with grpc.aio.insecure_channel(address) as channel:
            return await asyncio.wait_for(body(scheduler_pb2_grpc.SchedulerStub(channel)), 30)
    return asyncio.run(main())


async def stats_when(stub: scheduler_pb2_grpc.SchedulerStub, done, timeout: float = 5.0,
                     ) -> scheduler_pb2.StatsResponse:
    deadline = time.monotonic() + timeout
    while True:
        stats = await stub.Stats(scheduler_pb2.StatsRequest(), timeout=5)
        if done(stats) or time.monotonic() > deadline:
            return stats
        await asyncio.sleep(0.05)


def test_generate_streams_the_in_process_tokens(services: str, reference_tokens) -> None:
    async def body(stub):
        requests = [schedule_request(rid, p) for rid, p in prompts().items()]
        return await asyncio.gather(*(collect(stub, r) for r in requests))

    results = run(services, body)
    for (request_id, prompt), (tokens, outputs) in zip(prompts().items(), results):
        assert tokens == reference_tokens[request_id]
        last = outputs[-1]
        assert last.finished and last.finish_reason == "length"
        assert not any(out.finished for out in outputs[:-1])
        assert {out.request_id for out in outputs} == {request_id}
        assert last.num_prompt_tokens == len(prompt)


def test_cancelling_a_stream_aborts_it_and_frees_every_block(services: str) -> None:
    async def body(stub):
        calls = [stub.Generate(schedule_request(f"cancel-{i}", p, MAX_MODEL_LEN - len(p)))
                 for i, p in enumerate(prompts().values())]
        for call in calls:  # each has started generating
            await call.read()
        busy = await stub.Stats(scheduler_pb2.StatsRequest(), timeout=5)
        for call in calls:
            call.cancel()
        idle = await stats_when(stub, lambda s: s.num_running + s.num_waiting == 0
                                and s.blocks_free == s.blocks_total)
        return busy, idle

    busy, idle = run(services, body)
    assert busy.num_running + busy.num_waiting == len(prompts()) and busy.blocks_used > 0
    assert idle.num_running == idle.num_waiting == 0
    assert idle.blocks_free == idle.blocks_total and idle.blocks_used == 0
    assert idle.executor_connected and idle.steps > 0


def test_abort_rpc_ends_the_stream_with_reason_abort(services: str) -> None:
    async def body(stub):
        call = stub.Generate(schedule_request("to-abort", [11, 12, 13], 200), timeout=30)
        first = await call.read()
        found = await stub.Abort(scheduler_pb2.AbortRequest(request_id="to-abort"), timeout=5)
        rest = []
        while (out := await call.read()) is not grpc.aio.EOF:
            rest.append(out)
        missing = await stub.Abort(scheduler_pb2.AbortRequest(request_id="to-abort"), timeout=5)
        return first, found.found, rest, missing.found

    first, found, rest, missing = run(services, body)
    assert not first.finished and found and not missing
    assert rest[-1].finished and rest[-1].finish_reason == "abort"


def test_bad_requests_are_rejected_with_grpc_status(services: str) -> None:
    async def body(stub):
        codes = []
        too_long = schedule_request("too-long", list(range(10, 10 + MAX_MODEL_LEN + 1)), 1)
        for request in (too_long, schedule_request("empty", [], 4)):
            try:
                await collect(stub, request)
            except grpc.aio.AioRpcError as e:
                codes.append(e.code())
        first = stub.Generate(schedule_request("twice", [5, 6, 7], 200))
        await first.read()
        try:
            await collect(stub, schedule_request("twice", [5, 6, 7], 4))
        except grpc.aio.AioRpcError as e:
            codes.append(e.code())
        first.cancel()
        return codes

    assert run(services, body) == [grpc.StatusCode.INVALID_ARGUMENT,
                                   grpc.StatusCode.INVALID_ARGUMENT,
                                   grpc.StatusCode.ALREADY_EXISTS]


def test_model_info_is_the_executor_description(services: str) -> None:
    async def body(stub):
        return await stub.ModelInfo(scheduler_pb2.ModelInfoRequest(), timeout=5)

    info = run(services, body)
    assert isinstance(info, executor_pb2.DescribeResponse)
    assert info.architecture == "LlamaForCausalLM" and info.max_model_len == MAX_MODEL_LEN


def test_stats_times_the_step_phases(services: str) -> None:
    """The step counters grow with the steps run, each phase is counted, and the RPC round trip
    holds the executor's own compute (no timing is asserted beyond that)."""
    async def body(stub):
        before = await stats_when(stub, lambda s: s.num_running + s.num_waiting == 0)
        requests = [schedule_request(f"timed-{rid}", p, 8) for rid, p in prompts().items()]
        await asyncio.gather(*(collect(stub, r) for r in requests))
        return before, await stub.Stats(scheduler_pb2.StatsRequest(), timeout=5)

    before, after = run(services, body)
    delta = {f: getattr(after, f) - getattr(before, f) for f in (
        "steps", "step_schedule_seconds", "step_rpc_seconds", "step_execute_seconds",
        "step_apply_seconds", "step_running_requests_sum")}
    assert delta["steps"] >= 8, delta  # one step per token at least
    for phase in ("schedule", "rpc", "execute", "apply"):
        assert delta[f"step_{phase}_seconds"] > 0, delta
    assert after.step_rpc_seconds >= after.step_execute_seconds
    assert delta["step_rpc_seconds"] >= delta["step_execute_seconds"]
    # Every step of the window ran at least one of these requests, and at most all four.
    assert delta["steps"] <= delta["step_running_requests_sum"] <= 4 * delta["steps"], delta


# --- Session: many requests on one stream -------------------------------------------------------


async def session_collect(session: SchedulerSession, request: scheduler_pb2.ScheduleRequest
                          ) -> tuple[list[int], list[scheduler_pb2.TokenOutput]]:
    outputs = [out async for out in session.generate(request)]
    return [t for out in outputs for t in out.token_ids], outputs


def test_session_streams_the_in_process_tokens_batched_per_step(services: str,
                                                                reference_tokens) -> None:
    async def body(stub):
        requests = iter([scheduler_pb2.SessionRequest(schedule=schedule_request(rid, p))
                         for rid, p in prompts().items()])
        batches = [batch async for batch in stub.Session(requests, timeout=30)]
        session = SchedulerSession(stub)  # the router's end, on the same scheduler
        again = await asyncio.gather(*(session_collect(session, schedule_request(rid + "-r", p))
                                       for rid, p in prompts().items()))
        await session.close()
        return batches, again

    batches, again = run(services, body)
    outputs = [out for batch in batches for out in batch.outputs]
    for (request_id, prompt), (tokens, mine) in zip(prompts().items(), again):
        theirs = [out for out in outputs if out.request_id == request_id]
        assert [t for out in theirs for t in out.token_ids] == reference_tokens[request_id]
        assert tokens == reference_tokens[request_id]
        for outs in (theirs, mine):
            assert outs[-1].finished and outs[-1].finish_reason == "length"
            assert not any(out.finished for out in outs[:-1])
            assert outs[-1].num_prompt_tokens == len(prompt)
    # the requests decode together, so most steps carry all of them in one message
    assert max(len(batch.outputs) for batch in batches) == len(prompts())
    assert len(batches) < len(outputs)
    # the stream ended by itself once the caller was done and every request had finished


def test_session_cancel_and_close_abort_and_free_every_block(services: str) -> None:
    async def body(stub):
        session = SchedulerSession(stub)
        streams = [session.generate(schedule_request(f"s-cancel-{i}", p, MAX_MODEL_LEN - len(p)))
                   for i, p in enumerate(prompts().values())]
        for stream in streams:  # each has started generating
            await anext(stream)
        busy = await stub.Stats(scheduler_pb2.StatsRequest(), timeout=5)
        await streams[0].aclose()  # one cancelled by a message on the stream
        one_less = await stats_when(stub, lambda s: s.num_running + s.num_waiting
                                    == len(prompts()) - 1)
        await session.close()  # the rest with the stream
        idle = await stats_when(stub, lambda s: s.num_running + s.num_waiting == 0
                                and s.blocks_free == s.blocks_total)
        return busy, one_less, idle

    busy, one_less, idle = run(services, body)
    assert busy.num_running + busy.num_waiting == len(prompts()) and busy.blocks_used > 0
    assert one_less.num_running + one_less.num_waiting == len(prompts()) - 1
    assert idle.num_running == idle.num_waiting == 0 and idle.blocks_free == idle.blocks_total


def test_session_requests_fail_alone_with_their_grpc_status(services: str) -> None:
    async def body(stub):
        session = SchedulerSession(stub)
        running = session.generate(schedule_request("s-long", [11, 12, 13], 200))
        first = await anext(running)
        codes = []
        too_long = schedule_request("s-too-long", list(range(10, 10 + MAX_MODEL_LEN + 1)), 1)
        for request in (too_long, schedule_request("s-empty", [], 4),
                        schedule_request("s-long", [5, 6, 7], 4)):
            try:
                await session_collect(session, request)
            except grpc.aio.AioRpcError as e:
                codes.append(e.code())
        found = await stub.Abort(scheduler_pb2.AbortRequest(request_id="s-long"), timeout=5)
        rest = [out async for out in running]
        await session.close()
        return first, codes, found.found, rest

    first, codes, found, rest = run(services, body)
    assert codes == [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INVALID_ARGUMENT,
                     grpc.StatusCode.ALREADY_EXISTS]
    # the other request on the stream went on, until the Abort RPC ended it
    assert not first.finished and found
    assert rest[-1].finished and rest[-1].finish_reason == "abort"
