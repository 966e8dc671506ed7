"""The executor's gRPC server: Describe, the Execute step stream, and grpc.health.v1.

One executor holds one persistent batch state, so one Execute stream drives it at a time. A new
stream (a scheduler that reconnected or restarted) supersedes the old one: the old stream is aborted
at its next plan, and every request the executor still holds is forgotten first, so the new scheduler
starts from the clean state it assumes (it resends requests whole, as NewRequest). The model is
loaded and stepped on one thread whatever gRPC thread a call arrives on (see compute_thread).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pagedserve import tracing
from pagedserve.executor.compute_thread import ComputeThread
from pagedserve.executor.step_trace import StepTracer
from pagedserve.protos import executor_pb2, executor_pb2_grpc, grpc_options, tls
from pagedserve.protos.parse_guard import ParseGuard
from pagedserve.protos.request_checks import REFUSED_REQUEST_KEY, RequestRefused

log = structlog.get_logger("pagedserve.executor.server")

SERVICE_NAME = executor_pb2.DESCRIPTOR.services_by_name["Executor"].full_name


def server_options() -> list[tuple[str, int]]:
    """grpc_options.SERVER, its ping policy window overridable from the environment (tests)."""
    ms = int(os.environ.get(grpc_options.MIN_PING_INTERVAL_ENV, grpc_options.MIN_PING_INTERVAL_MS))
    return list({**grpc_options.SERVER, grpc_options.MIN_PING_INTERVAL: ms}.items())


class ExecutorService(executor_pb2_grpc.ExecutorServicer):
    """Serves one executor object (anything with describe() and execute(plan))."""

    def __init__(self) -> None:
        self._executor: Any = None
        self._compute = ComputeThread()
        self._lock = threading.Lock()  # one step at a time, and guards the fields below
        self._stream = 0  # id of the stream that currently owns the executor
        self._live: set[str] = set()  # request ids the executor holds state for
        tracer = tracing.tracer()
        self._trace = StepTracer(tracer) if tracer is not None else None

    def end_traces(self) -> None:
        """Ends the spans of requests not forgotten yet (the last ones, at shutdown)."""
        with self._lock:
            if self._trace is not None:
                self._trace.end_all()

    def load(self, factory: Callable[[], Any]) -> None:
        """Builds the executor on the compute thread (its weights, KV cache and OpenMP team)."""
        self._executor = self._compute.run(factory)

    def close_executor(self) -> None:
        """Stops what the executor started (its tensor-parallel ranks), on the compute thread."""
        close = getattr(self._executor, "close", None)
        if close is not None:  # not waited on for ever: a step stuck in a collective holds it
            closer = threading.Thread(target=self._compute.run, args=(close,), daemon=True)
            closer.start()
            closer.join(30.0)

    def Describe(self, request: executor_pb2.DescribeRequest,
                 context: grpc.ServicerContext) -> executor_pb2.DescribeResponse:
        return self._require(context).describe()

    def Execute(self, request_iterator: Iterator[executor_pb2.StepPlan],
                context: grpc.ServicerContext) -> Iterator[executor_pb2.StepResult]:
        self._require(context)
        stream = self._begin_stream()
        log.info("execute stream opened", stream=stream, peer=context.peer())
        for plan in request_iterator:
            yield self._step(stream, plan, context)
        log.info("execute stream closed", stream=stream)

    def _require(self, context: grpc.ServicerContext) -> Any:
        if self._executor is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading")
        return self._executor

    def _begin_stream(self) -> int:
        with self._lock:
            self._stream += 1
            if self._trace is not None:
                self._trace.end_all()
            if self._live:
                log.info("forgetting requests of a previous stream", count=len(self._live))
                forget = executor_pb2.StepPlan(forget_request_ids=sorted(self._live))
                self._compute.run(self._executor.execute, forget)
                self._live.clear()
            return self._stream

    def _step(self, stream: int, plan: executor_pb2.StepPlan,
              context: grpc.ServicerContext) -> executor_pb2.StepResult:
        with self._lock:
            if stream != self._stream:
                context.abort(grpc.StatusCode.ABORTED, "superseded by a newer Execute stream")
            start_ns = time.time_ns()
            try:
                result = self._compute.run(self._executor.execute, plan)
            except Exception as e:
                # It may have taken in its new requests before failing: the next stream must
                # forget them too, or their ids stay held and every resend is refused.
                self._live.update(r.request_id for r in plan.new_requests)
                if isinstance(e, RequestRefused):  # the scheduler fails this request alone
                    context.set_trailing_metadata(
                        ((REFUSED_REQUEST_KEY, e.request_id.encode()),))
                log.exception("step failed", step_id=plan.step_id)
                code = (grpc.StatusCode.INVALID_ARGUMENT if isinstance(e, ValueError)
                        else grpc.StatusCode.INTERNAL)
                context.abort(code, f"step {plan.step_id} failed: {e!r}")
            self._live.difference_update(plan.forget_request_ids)
            self._live.update(r.request_id for r in plan.new_requests)
            if self._trace is not None:
                self._trace.step(plan, start_ns, time.time_ns())
            return result


def build_server(service: ExecutorService, listen: str, *, reflection: bool = False,
                 max_workers: int = 8) -> tuple[grpc.Server, health.HealthServicer]:
    """A started-later gRPC server with the executor, health and (optionally) reflection."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers),
                         options=server_options(), interceptors=[ParseGuard()])
    executor_pb2_grpc.add_ExecutorServicer_to_server(service, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    if reflection:
        from grpc_reflection.v1alpha import reflection as grpc_reflection

        names = (SERVICE_NAME, health.SERVICE_NAME, grpc_reflection.SERVICE_NAME)
        grpc_reflection.enable_server_reflection(names, server)
    if tls.add_port(server, listen) == 0:
        raise OSError(f"listen: cannot bind {listen}")
    return server, health_servicer


def run_executor(config: Any, listen: str, *, reflection: bool = False,
                 grace: float = 5.0) -> int:
    """Loads the model behind `listen` and serves until SIGTERM or SIGINT. Returns an exit code.

    The port opens first (health NOT_SERVING, Describe UNAVAILABLE), so a supervisor can tell
    "loading" from "gone"; health turns SERVING once the weights and KV cache are in place.
    """
    from pagedserve.executor.executor import Executor

    service = ExecutorService()
    server, health_servicer = build_server(service, listen, reflection=reflection)
    stop = threading.Event()
    loaded = threading.Event()
    _install_signal_handlers(stop, loaded)
    server.start()
    log.info("executor listening", listen=listen, model=str(config.model))
    try:
        service.load(lambda: Executor(config))
        loaded.set()
        desc = service._executor.describe()
        log.info("executor ready", model=desc.model, dtype=desc.dtype, device=desc.device,
                 num_kv_blocks=desc.num_kv_blocks, block_size=desc.block_size,
                 max_model_len=desc.max_model_len)
        for name in ("", SERVICE_NAME):
            health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        rc = _serve_until_stopped(stop, service._executor)
        log.info("executor stopping", grace_s=grace)
        health_servicer.enter_graceful_shutdown()
    finally:
        server.stop(grace).wait()
        service.end_traces()
        service.close_executor()
    return rc


def _serve_until_stopped(stop: threading.Event, executor: Any) -> int:
    """Waits for a stop signal: 0. A tensor-parallel rank that dies ends the executor with 1
    (it cannot step without it); `serve`'s supervisor restarts it, as any executor that exits."""
    failure = getattr(executor, "rank_failure", None)
    while not stop.wait(1.0 if failure is not None else None):
        reason = failure()
        if reason is not None:
            log.error("executor cannot continue", reason=reason)
            return 1
    return 0


def _install_signal_handlers(stop: threading.Event, loaded: threading.Event) -> None:
    def handler(signum: int, frame: object) -> None:
        if not loaded.is_set():
            raise SystemExit(128 + signum)  # interrupt a model load at once
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
