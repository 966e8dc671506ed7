"""A request that outlives its scheduler: resubmitted as a continuation when the stream breaks.

The router holds, for each open request, what it needs to resume it: the ScheduleRequest it sent
(prompt ids, sampling parameters with the seed, stop rules) and every token id the scheduler has
sent since. When the scheduler goes away (the stream fails UNAVAILABLE: killed, restarted, or a
replica taken out), the same request is sent again with those tokens as output_token_ids, to the
restarted scheduler or, behind a replica set, to another. Outputs keep their positions there, so a
greedy or seeded request continues exactly as an undisturbed run would, and the client's stream
goes on with no token repeated or missing (the detokenizer and stop strings never notice). The
router retries with a growing pause until resume_timeout_s has passed without a scheduler
answering, then fails the request as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import grpc
import structlog

from pagedserve.protos import scheduler_pb2
from pagedserve.router.scheduler_client import SchedulerClient

log = structlog.get_logger("pagedserve.router")
FIRST_PAUSE_S, MAX_PAUSE_S = 0.05, 1.0


def continuation(request: scheduler_pb2.ScheduleRequest,
                 got: list[int]) -> scheduler_pb2.ScheduleRequest:
    """The request again, after the outputs the client already has."""
    again = scheduler_pb2.ScheduleRequest()
    again.CopyFrom(request)
    again.output_token_ids.extend(got)
    return again


async def resumable_outputs(client: SchedulerClient, request: scheduler_pb2.ScheduleRequest,
                            resume_timeout_s: float) -> AsyncIterator[scheduler_pb2.TokenOutput]:
    """The scheduler's outputs for request, across scheduler restarts (see the module doc)."""
    got: list[int] = []
    deadline: float | None = None
    pause = FIRST_PAUSE_S
    while True:
        sent = continuation(request, got) if got else request
        try:
            async with contextlib.aclosing(client.generate(sent)) as stream:
                async for out in stream:
                    deadline, pause = None, FIRST_PAUSE_S
                    got.extend(out.token_ids)
                    yield out
            return
        except grpc.aio.AioRpcError as e:
            # ALREADY_EXISTS while resuming: the old scheduler has not yet dropped the request of
            # the broken stream (a replica that lives on aborts it shortly)
            retry = e.code() == grpc.StatusCode.UNAVAILABLE or (
                deadline is not None and e.code() == grpc.StatusCode.ALREADY_EXISTS)
            if not retry or resume_timeout_s <= 0:
                raise
            now = time.monotonic()
            if deadline is None:
                deadline = now + resume_timeout_s
                log.warning("scheduler gone; resuming the request", request_id=request.request_id,
                            outputs_so_far=len(got), error=e.details())
            if now >= deadline:
                raise
        await asyncio.sleep(pause)
        pause = min(MAX_PAUSE_S, pause * 2)
