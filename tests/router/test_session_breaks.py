"""A Session stream that breaks with a status other than UNAVAILABLE still resumes its requests.

A scheduler killed while it writes a message leaves gRPC's core on the router's side ending the
stream INTERNAL ("Internal error from Core"), not UNAVAILABLE (seen in tests/services'
test_scheduler_restart under load). The scheduler here is a real gRPC server on a unix socket
whose first Session sends the request's first tokens and then ends the stream with such a status;
the router's resumable_outputs must send the continuation to the next Session and deliver every
token once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from pagedserve.protos import scheduler_pb2, scheduler_pb2_grpc
from pagedserve.router.resume import resumable_outputs
from pagedserve.router.scheduler_client import SchedulerClient

FIRST, REST = [5, 6, 7], [8, 9]


class BreakingScheduler(scheduler_pb2_grpc.SchedulerServicer):
    """Session 1: the first tokens, then the stream ends with `code`. Session 2: the rest."""

    def __init__(self, code: grpc.StatusCode) -> None:
        self.code = code
        self.received: list[scheduler_pb2.ScheduleRequest] = []

    async def Session(self, request_iterator: AsyncIterator[scheduler_pb2.SessionRequest],
                      context: grpc.aio.ServicerContext
                      ) -> AsyncIterator[scheduler_pb2.TokenOutputBatch]:
        msg = await anext(aiter(request_iterator))
        self.received.append(msg.schedule)
        rid = msg.schedule.request_id
        if len(self.received) == 1:
            yield scheduler_pb2.TokenOutputBatch(outputs=[
                scheduler_pb2.TokenOutput(request_id=rid, token_ids=FIRST)])
            await context.abort(self.code, "Internal error from Core")
        yield scheduler_pb2.TokenOutputBatch(outputs=[scheduler_pb2.TokenOutput(
            request_id=rid, token_ids=REST, finished=True, finish_reason="length")])


async def _resume_through(sock: Path, code: grpc.StatusCode
                          ) -> tuple[list[int], list[scheduler_pb2.ScheduleRequest]]:
    server = grpc.aio.server()
    scheduler = BreakingScheduler(code)
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(scheduler, server)
    address = f"unix://{sock}"
    server.add_insecure_port(address)
    await server.start()
    client = SchedulerClient(address)
    try:
        request = scheduler_pb2.ScheduleRequest(request_id="r", prompt_token_ids=[1, 2, 3])
        tokens = [t async for out in resumable_outputs(client, request, resume_timeout_s=10)
                  for t in out.token_ids]
    finally:
        await client.close()
        await server.stop(None)
    return tokens, scheduler.received


@pytest.mark.parametrize("code", [grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
                                  grpc.StatusCode.UNAVAILABLE])
def test_a_broken_session_resumes_whatever_status_the_transport_gave(
        tmp_path: Path, code: grpc.StatusCode) -> None:
    tokens, received = asyncio.run(_resume_through(tmp_path / "s.sock", code))
    assert tokens == FIRST + REST
    assert [list(r.output_token_ids) for r in received] == [[], FIRST]
    assert all(list(r.prompt_token_ids) == [1, 2, 3] for r in received)
