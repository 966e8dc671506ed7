"""The scheduler server's step loop: one asyncio task that owns the Scheduler.

    while there is work:  plan = schedule()  ->  Execute stream  ->  apply_result(result)
                          -> each delta to its request's sink (an asyncio queue, or a
                             Session's batch: anything with put_nowait)

Everything touching the Scheduler runs on the event loop thread, so no lock is needed; while a plan
is in flight, new requests and aborts are held back and applied after its result, so the Scheduler
never sees a change between schedule() and apply_result(). When the executor goes away, the scheduler forgets what the executor
held (`reset_executor_state`: running requests wait again, keeping their tokens) and the loop
reconnects with backoff; the next executor is refilled by recompute, and no request is lost.

Each step that reaches the executor is timed by phase into `timings` (a StepTimings): schedule(),
the Execute round trip, the executor's own compute as it reports it, and apply_result + fan-out.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from pagedserve import tracing
from pagedserve.protos import executor_pb2, scheduler_pb2
from pagedserve.scheduler.config import SchedulerConfig
from pagedserve.scheduler.executor_client import AsyncExecutorConnection, ExecutorGone
from pagedserve.scheduler.outputs import RequestOutputDelta
from pagedserve.scheduler.request_spec import RequestSpec
from pagedserve.scheduler.request_trace import RequestTracer
from pagedserve.scheduler.scheduler import Scheduler
from pagedserve.scheduler.step_history import StepHistory, request_split
from pagedserve.scheduler.step_timing import StepTimings

log = structlog.get_logger("pagedserve.scheduler.step_loop")


class DeltaSink(Protocol):
    """Where a request's deltas go: its own asyncio.Queue, or a Session's shared batch."""

    def put_nowait(self, delta: RequestOutputDelta) -> None: ...


@dataclass
class _Sent:
    """A plan on its way to the executor, and what was known of it when it was planned."""

    plan: executor_pb2.StepPlan
    split: list[tuple[str, int, int]]  # step_history.request_split, taken at planning time
    planned_at: float
    sent_at: float


DEFAULT_STEP_TIMEOUT_S = 120.0
# The pool and model facts a scheduler was built on: a new executor must agree on them.
_POOL_FACTS = ("block_size", "num_kv_blocks", "max_model_len")


class StepLoop:
    def __init__(self, executor_address: str, scheduler_options: dict[str, Any] | None = None,
                 *, describe_timeout: float = 5.0,
                 step_timeout: float = DEFAULT_STEP_TIMEOUT_S) -> None:
        self.executor_address = executor_address
        self._options = dict(scheduler_options or {})
        self._describe_timeout = describe_timeout
        # a step with no result by then: the executor is hung (stopped, deadlocked), and is
        # treated as lost (its requests recomputed on the next one); 0: no deadline
        self._step_timeout = step_timeout
        self._conn = AsyncExecutorConnection(executor_address)
        self.scheduler: Scheduler | None = None
        self.model_info: executor_pb2.DescribeResponse | None = None
        self.connected = False
        self.timings = StepTimings()  # steps that reached the executor, and their phases
        self.history = StepHistory()  # the latest steps, for the dashboard
        tracer = tracing.tracer()
        self.trace = RequestTracer(tracer) if tracer is not None else None
        self.ready = asyncio.Event()  # set once the first executor described itself
        self._wake = asyncio.Event()
        self._streams: dict[str, DeltaSink] = {}
        self._pending_adds: list[RequestSpec] = []
        self._pending_aborts: list[str] = []
        self._in_step = False
        self._flush_forgets = False
        self._failures = 0  # executor losses since the last good step

    # --- the loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            while True:
                if not self.connected:
                    await self._connect()
                elif self.scheduler is not None and (self.scheduler.has_unfinished()
                                                     or self._flush_forgets):
                    self._flush_forgets = False  # an abort's forget id goes out even when idle
                    await self._step_once()
                else:
                    await self._idle()
        finally:
            await self._conn.close()

    async def _step_once(self) -> None:
        """schedule -> Execute -> apply_result and fan-out, each phase timed (see StepTimings).

        With async scheduling (SchedulerConfig.async_scheduling), while a step runs the next one
        is planned and sent when Scheduler.schedule_ahead can (decoding requests only), so the
        executor finds it waiting and never idles for the round trip and the scheduling; this
        repeats until a step's result comes back with nothing planned past it."""
        assert self.scheduler is not None
        start = time.perf_counter()
        plan = self.scheduler.schedule()
        if not (plan.new_requests or plan.continuing_requests or plan.forget_request_ids):
            await self._nothing_scheduled(plan)
            return
        sent = [self._planned(plan, start)]
        if not await self._send(plan):
            return
        last_received = 0.0
        while sent:
            ahead = self._plan_ahead()
            if ahead is not None:
                sent.append(ahead)
                if not await self._send(ahead.plan):
                    return
            step = sent.pop(0)
            result = await self._receive(step.plan)
            if result is None:
                return
            received = time.perf_counter()
            # a plan sent before the previous result came back started when that step ended
            began = max(step.sent_at, last_received)
            self._applied(step, result, rpc=received - began)
            last_received = received

    def _plan_ahead(self) -> _Sent | None:
        assert self.scheduler is not None
        if not self.scheduler.config.async_scheduling:
            return None
        start = time.perf_counter()
        plan = self.scheduler.schedule_ahead()
        return None if plan is None else self._planned(plan, start)

    def _planned(self, plan: executor_pb2.StepPlan, start: float) -> _Sent:
        assert self.scheduler is not None
        split = request_split(self.scheduler, plan)  # once, for the history and the trace
        if self.trace is not None:
            self.trace.planned(self.scheduler, plan, split)
        return _Sent(plan, split, start, time.perf_counter())

    def _applied(self, step: _Sent, result: executor_pb2.StepResult, *, rpc: float) -> None:
        """apply_result and fan-out of one step's result, and its timings and history."""
        assert self.scheduler is not None
        start = time.perf_counter()
        plan, split, schedule = step.plan, step.split, step.sent_at - step.planned_at
        self._failures = 0
        deltas = self.scheduler.apply_result(result)
        self._trace_applied(deltas)
        self._fan_out(deltas)
        self._apply_pending()
        done = time.perf_counter()
        running = len(plan.new_requests) + len(plan.continuing_requests)
        self.timings.add(schedule=schedule, rpc=rpc, execute=result.execute_seconds,
                         apply=done - start, running=running)
        self.history.record(seconds=schedule + rpc + done - start,
                            prefill=sum(p for _, p, _ in split),
                            decode=sum(d for _, _, d in split),
                            outputs=sum(len(d.new_token_ids) for d in deltas), requests=running)

    async def _nothing_scheduled(self, plan: executor_pb2.StepPlan) -> None:
        assert self.scheduler is not None
        deltas = self.scheduler.apply_result(executor_pb2.StepResult(step_id=plan.step_id))
        self._trace_applied(deltas)
        self._fan_out(deltas)
        if self.scheduler.has_unfinished():
            await self._wait_for_work(0.05)  # nothing fits right now; don't spin

    async def _send(self, plan: executor_pb2.StepPlan) -> bool:
        """False when the executor went away (then handled here)."""
        try:
            await self._conn.send(plan)
            return True
        except ExecutorGone as e:
            self._gone(e)
            return False

    async def _receive(self, plan: executor_pb2.StepPlan) -> executor_pb2.StepResult | None:
        """The plan's result, or None when the executor went away (then handled here)."""
        self._in_step = True
        try:
            return await asyncio.wait_for(self._conn.receive(plan), self._step_timeout or None)
        except ExecutorGone as e:
            self._gone(e)
            return None
        except asyncio.TimeoutError:
            self._lost_executor(f"no result within the step timeout ({self._step_timeout} s)")
            return None
        finally:
            self._in_step = False

    def _gone(self, e: ExecutorGone) -> None:
        if e.refused_request_id is not None:  # it would be refused again, in every plan
            log.warning("executor refused a request; aborting it",
                        request_id=e.refused_request_id, reason=str(e))
            self.abort(e.refused_request_id)
        self._lost_executor(str(e))

    async def _idle(self) -> None:
        """Waits for a request, and notices meanwhile when the executor's channel drops."""
        channel_down = asyncio.ensure_future(self._conn.wait_until_not_ready())
        woken = asyncio.ensure_future(self._wake.wait())
        done, _ = await asyncio.wait({channel_down, woken}, return_when=asyncio.FIRST_COMPLETED)
        for task in (channel_down, woken):
            task.cancel()
        self._wake.clear()
        if channel_down in done and not channel_down.cancelled() and self.connected:
            self._lost_executor("channel left READY while idle")

    async def _wait_for_work(self, timeout: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)
        self._wake.clear()

    # --- executor connection ----------------------------------------------------------------

    async def _connect(self) -> None:
        """Describe the executor until it answers, with backoff; adopt it if it fits.

        Losses with no good step between them back off too, so an executor that fails every
        step (rather than dying) is not hammered.
        """
        if self._failures > 1:
            await asyncio.sleep(min(0.1 * 2 ** (self._failures - 2), 5.0))
        delay, last_log = 0.05, 0.0
        while True:
            try:
                desc = await self._conn.describe(self._describe_timeout)
            except ExecutorGone as e:
                if time.monotonic() - last_log > 10.0:
                    log.info("waiting for executor", address=self.executor_address, error=str(e))
                    last_log = time.monotonic()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            if self._adopt(desc):
                return
            await asyncio.sleep(2.0)

    def _adopt(self, desc: executor_pb2.DescribeResponse) -> bool:
        old = self.model_info
        same = old is not None and all(getattr(old, f) == getattr(desc, f) for f in _POOL_FACTS)
        if self.scheduler is not None and not same:
            if self.scheduler.has_unfinished():
                log.error("executor pool differs from the one in use; not adopting it",
                          **{f: (getattr(old, f), getattr(desc, f)) for f in _POOL_FACTS})
                return False
            self.scheduler = None
        if self.scheduler is None:
            config = SchedulerConfig.from_describe(desc, **self._options)
            try:
                config.check_executor(desc)  # e.g. a draft_model scheduler, no draft model there
            except ValueError as e:
                log.error("executor cannot run this scheduler's plans; not adopting it",
                          error=str(e))
                return False
            self.scheduler = Scheduler(config)
        self.model_info = desc
        self.connected = True
        self.ready.set()
        self._wake.set()
        log.info("executor connected", address=self.executor_address, model=desc.model,
                 num_kv_blocks=desc.num_kv_blocks, block_size=desc.block_size)
        return True

    def _lost_executor(self, why: str) -> None:
        log.warning("executor lost; requests will be recomputed", reason=why,
                    address=self.executor_address)
        self.connected = False
        self._failures += 1
        self._conn.drop_stream()
        if self.scheduler is not None:
            self.scheduler.reset_executor_state()
        self._apply_pending()

    # --- requests ---------------------------------------------------------------------------

    def submit(self, req: scheduler_pb2.ScheduleRequest, sink: DeltaSink | None = None
               ) -> DeltaSink:
        """Adds a request; its deltas go to `sink`, by default a new asyncio.Queue (returned).

        Raises KeyError for a request id already streaming, ValueError for an invalid request.
        """
        assert self.scheduler is not None, "submit before the executor was described"
        if req.request_id in self._streams:
            raise KeyError(req.request_id)
        spec = RequestSpec.from_proto(self.scheduler.config, req)  # checked once, here
        if self.trace is not None:
            self.trace.admitted(req.request_id, req.traceparent)
        sink = asyncio.Queue() if sink is None else sink
        self._streams[req.request_id] = sink
        self._pending_adds.append(spec)
        if not self._in_step:
            self._apply_pending()
        self._wake.set()
        return sink

    def _add(self, spec: RequestSpec) -> None:
        assert self.scheduler is not None
        try:
            self.scheduler.add(spec)
        except ValueError as e:  # an id in use: the checks themselves ran in submit()
            log.warning("request rejected", request_id=spec.request_id, error=str(e))
            self._close_stream(spec.request_id, notify=True)

    def abort(self, request_id: str, *, notify: bool = True) -> bool:
        """Aborts a request (now, or after the step in flight); its stream gets a final 'abort'."""
        if not self._close_stream(request_id, notify):
            return False
        self._pending_aborts.append(request_id)
        self._flush_forgets = True
        if not self._in_step:
            self._apply_pending()
        self._wake.set()
        return True

    def _close_stream(self, request_id: str, notify: bool) -> bool:
        sink = self._streams.pop(request_id, None)
        if sink is None:
            return False
        if self.trace is not None:
            self.trace.ended(request_id, "abort")
        if notify:
            sink.put_nowait(RequestOutputDelta(
                request_id=request_id, new_token_ids=[], new_logprobs=None,
                new_top_logprobs=None, finished=True, finish_reason="abort",
                num_prompt_tokens=0, num_cached_tokens=0))
        return True

    def _apply_pending(self) -> None:
        """Adds and aborts held back while a plan was in flight, in arrival order per kind."""
        if self.scheduler is None:
            return
        adds, self._pending_adds = self._pending_adds, []
        for req in adds:
            self._add(req)
        aborts, self._pending_aborts = self._pending_aborts, []
        for request_id in aborts:
            self.scheduler.abort(request_id)

    def _trace_applied(self, deltas: list[RequestOutputDelta]) -> None:
        if self.trace is not None:
            self.trace.applied({d.request_id: d.finish_reason or "stop" for d in deltas
                                if d.finished})

    def _fan_out(self, deltas: list[RequestOutputDelta]) -> None:
        for delta in deltas:
            sink = self._streams.get(delta.request_id)
            if sink is None:
                continue
            sink.put_nowait(delta)
            if delta.finished:
                del self._streams[delta.request_id]

    @property
    def steps(self) -> int:
        return self.timings.steps

    @property
    def num_streams(self) -> int:
        return len(self._streams)

    async def drain(self, timeout: float) -> None:
        """Waits until every open request stream has finished, or `timeout` seconds passed."""
        deadline = time.monotonic() + timeout
        while self._streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._streams:
            log.warning("drain timed out; aborting", open_requests=len(self._streams))
            for request_id in list(self._streams):
                self.abort(request_id)

