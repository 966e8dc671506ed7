"""Admitting a request into the step loop, and the gRPC status it fails with when it cannot be."""

from __future__ import annotations

import asyncio

import grpc

from pagedserve.protos import scheduler_pb2
from pagedserve.scheduler.step_loop import DeltaSink, StepLoop


async def admit(loop: StepLoop, request: scheduler_pb2.ScheduleRequest, sink: DeltaSink, *,
                accepting: bool, timeout: float | None) -> tuple[grpc.StatusCode, str] | None:
    """None once the request is in the loop (its deltas go to `sink`); otherwise the status and
    message its call ends with. Waits up to `timeout` seconds (None: for ever) for an executor."""
    if not accepting:
        return grpc.StatusCode.UNAVAILABLE, "the scheduler is shutting down"
    try:
        await asyncio.wait_for(loop.ready.wait(), timeout)
    except asyncio.TimeoutError:
        return grpc.StatusCode.UNAVAILABLE, "no executor has connected yet"
    try:
        loop.submit(request, sink)
    except KeyError:
        return grpc.StatusCode.ALREADY_EXISTS, f"request_id {request.request_id!r} is already running"
    except ValueError as e:
        return grpc.StatusCode.INVALID_ARGUMENT, str(e)
    return None
