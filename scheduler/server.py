"""The scheduler's gRPC server (grpc.aio): Generate, Session, Abort, Stats, ModelInfo and
grpc.health.v1.

Generate adds the request to the step loop and streams its TokenOutputs until it finishes; a
ScheduleRequest with max_tokens 0 may generate up to max_model_len. When the caller cancels the
stream (or goes away), the request is aborted and its blocks are freed at the next step.
Session (scheduler/session.py) does the same for many requests on one stream, their outputs
batched per step. Health turns SERVING once an executor has described itself; shutdown (SIGTERM,
SIGINT) stops taking requests, lets the open ones finish (up to a drain timeout), then stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pagedserve.protos import executor_pb2, grpc_options, scheduler_pb2, scheduler_pb2_grpc, tls
from pagedserve.protos.parse_guard import AioParseGuard
from pagedserve.scheduler.admission import admit
from pagedserve.scheduler.outputs import RequestOutputDelta
from pagedserve.scheduler.session import run_session
from pagedserve.scheduler.snapshot import snapshot
from pagedserve.scheduler.step_loop import DEFAULT_STEP_TIMEOUT_S, StepLoop
from pagedserve.scheduler.step_timing import StepTimings
from pagedserve.scheduler.token_output import append_delta
from pagedserve.shutdown_watchdog import ShutdownWatchdog

log = structlog.get_logger("pagedserve.scheduler.server")

SERVICE_NAME = scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name


def server_options() -> list[tuple[str, int]]:
    """grpc_options.SERVER, its ping policy window overridable from the environment (tests)."""
    ms = int(os.environ.get(grpc_options.MIN_PING_INTERVAL_ENV, grpc_options.MIN_PING_INTERVAL_MS))
    return list({**grpc_options.SERVER, grpc_options.MIN_PING_INTERVAL: ms}.items())


def _token_output(first: RequestOutputDelta,
                  queue: asyncio.Queue[RequestOutputDelta]) -> scheduler_pb2.TokenOutput:
    """One TokenOutput from `first` and whatever else already waits in the queue."""
    out = scheduler_pb2.TokenOutput(request_id=first.request_id)
    delta = first
    while True:
        append_delta(out, delta)
        if delta.finished or queue.empty():
            return out
        delta = queue.get_nowait()


def _step_stats(t: StepTimings) -> scheduler_pb2.StatsResponse:
    """The step loop's counters since start, as Stats reports them."""
    return scheduler_pb2.StatsResponse(
        steps=t.steps, step_schedule_seconds=t.schedule_seconds, step_rpc_seconds=t.rpc_seconds,
        step_execute_seconds=t.execute_seconds, step_apply_seconds=t.apply_seconds,
        step_running_requests_sum=t.running_requests_sum)


class SchedulerService(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self, loop: StepLoop) -> None:
        self._loop = loop
        self.accepting = True

    async def Generate(self, request: scheduler_pb2.ScheduleRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[scheduler_pb2.TokenOutput]:
        queue = await self._admit(request, context)
        finished = False
        try:
            while not finished:
                out = _token_output(await queue.get(), queue)
                finished = out.finished
                yield out
        finally:
            if not finished:  # cancelled, or the client went away
                self._loop.abort(request.request_id, notify=False)

    async def _admit(self, request: scheduler_pb2.ScheduleRequest,
                     context: grpc.aio.ServicerContext) -> asyncio.Queue[RequestOutputDelta]:
        queue: asyncio.Queue[RequestOutputDelta] = asyncio.Queue()
        error = await admit(self._loop, request, queue, accepting=self.accepting,
                            timeout=context.time_remaining())
        if error is not None:
            await context.abort(*error)
        return queue

    async def Session(self, request_iterator: AsyncIterator[scheduler_pb2.SessionRequest],
                      context: grpc.aio.ServicerContext
                      ) -> AsyncIterator[scheduler_pb2.TokenOutputBatch]:
        async for batch in run_session(self._loop, request_iterator, lambda: self.accepting):
            yield batch

    async def Abort(self, request: scheduler_pb2.AbortRequest,
                    context: grpc.aio.ServicerContext) -> scheduler_pb2.AbortResponse:
        return scheduler_pb2.AbortResponse(found=self._loop.abort(request.request_id))

    async def Stats(self, request: scheduler_pb2.StatsRequest,
                    context: grpc.aio.ServicerContext) -> scheduler_pb2.StatsResponse:
        resp = _step_stats(self._loop.timings)
        resp.executor_connected = self._loop.connected
        if self._loop.scheduler is None:
            return resp
        s = self._loop.scheduler.stats()
        resp.num_waiting, resp.num_running = s.num_waiting, s.num_running
        resp.num_preemptions = s.num_preemptions
        resp.blocks_total, resp.blocks_free = s.blocks_total, s.blocks_free
        resp.blocks_used = s.blocks_in_use
        resp.prefix_cache_queries, resp.prefix_cache_hits = (s.prefix_cache_queries,
                                                              s.prefix_cache_hits)
        resp.prefix_cache_hit_rate = s.prefix_cache_hit_rate
        resp.spec_draft_tokens, resp.spec_accepted_tokens = (s.spec_draft_tokens,
                                                             s.spec_accepted_tokens)
        resp.spec_verifications = s.spec_verifications
        return resp

    async def Snapshot(self, request: scheduler_pb2.SnapshotRequest,
                       context: grpc.aio.ServicerContext) -> scheduler_pb2.SnapshotResponse:
        if self._loop.scheduler is None:  # no executor yet: no pool to show
            return scheduler_pb2.SnapshotResponse()
        return snapshot(self._loop.scheduler, self._loop.history, request.max_requests)

    async def ModelInfo(self, request: scheduler_pb2.ModelInfoRequest,
                        context: grpc.aio.ServicerContext) -> executor_pb2.DescribeResponse:
        if self._loop.model_info is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no executor has connected yet")
        return self._loop.model_info


async def _build_server(service: SchedulerService, listen: str, *,
                        reflection: bool) -> tuple[grpc.aio.Server, Any]:
    server = grpc.aio.server(options=server_options(), interceptors=[AioParseGuard()])
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(service, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    if reflection:
        from grpc_reflection.v1alpha import reflection as grpc_reflection

        names = (SERVICE_NAME, health.SERVICE_NAME, grpc_reflection.SERVICE_NAME)
        grpc_reflection.enable_server_reflection(names, server)
    if tls.add_port(server, listen) == 0:
        raise OSError(f"listen: cannot bind {listen}")
    return server, health_servicer


async def _serving_when_ready(loop: StepLoop, health_servicer: Any) -> None:
    await loop.ready.wait()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("scheduler serving")


async def serve(executor_address: str, listen: str, *,
                scheduler_options: dict[str, Any] | None = None, reflection: bool = False,
                drain_timeout: float = 30.0, stop: asyncio.Event | None = None,
                step_timeout: float = DEFAULT_STEP_TIMEOUT_S,
                drained: Callable[[int], None] | None = None) -> int:
    """Runs the scheduler server until `stop` is set (default: on SIGTERM or SIGINT);
    `drained(exit_code)` is called once no request is left, before the teardown."""
    loop = StepLoop(executor_address, scheduler_options, step_timeout=step_timeout)
    service = SchedulerService(loop)
    server, health_servicer = await _build_server(service, listen, reflection=reflection)
    await server.start()
    log.info("scheduler listening", listen=listen, executor=executor_address)
    stop = stop or _stop_on_signals()
    loop_task = asyncio.create_task(loop.run(), name="step-loop")
    ready_task = asyncio.create_task(_serving_when_ready(loop, health_servicer))
    stop_task = asyncio.create_task(stop.wait())
    await asyncio.wait({loop_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
    crashed = loop_task.done()
    if crashed:
        log.error("step loop died", exc_info=loop_task.exception())
    service.accepting = False
    await health_servicer.enter_graceful_shutdown()
    if not crashed:
        log.info("scheduler draining", open_requests=loop.num_streams, timeout_s=drain_timeout)
        await loop.drain(drain_timeout)
    if drained is not None:
        drained(1 if crashed else 0)
    await server.stop(grace=1.0)
    for task in (loop_task, ready_task, stop_task):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    log.info("scheduler stopped")
    return 1 if crashed else 0


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    running = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        running.add_signal_handler(sig, stop.set)
    return stop


def run_scheduler(executor_address: str, listen: str, **kwargs: Any) -> int:
    """Blocking entry point for `pagedserve scheduler` (uvloop when installed); the teardown
    after the drain, the interpreter's included, is bounded (pagedserve/shutdown_watchdog.py)."""
    main = serve(executor_address, listen, drained=ShutdownWatchdog("scheduler").arm, **kwargs)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
