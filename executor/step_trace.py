"""The executor's span of each request: the steps it took part in, aggregated into one span
(`executor.request`, a child of the scheduler's span; pagedserve/tracing.py) from the start of its
first step to the end of its last, with the number of steps and tokens computed. One span per step
would be thousands per request; this one says where the executor's time went without that cost.
Built only when tracing is on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pagedserve import tracing
from pagedserve.protos import executor_pb2


@dataclass
class _Traced:
    span: Any
    steps: int = 0
    tokens: int = 0
    last_end_ns: int = 0


class StepTracer:
    def __init__(self, tracer: Any) -> None:
        self.tracer = tracer
        self.traced: dict[str, _Traced] = {}

    def step(self, plan: executor_pb2.StepPlan, start_ns: int, end_ns: int) -> None:
        """A step that ran from start_ns to end_ns (time.time_ns())."""
        for rid in plan.forget_request_ids:  # forgotten before the step ran: done by then
            self._end(rid)
        for new in plan.new_requests:
            if new.traceparent and new.request_id not in self.traced:
                span = self.tracer.start_span(
                    "executor.request", context=tracing.parent_context(new.traceparent),
                    start_time=start_ns, attributes={"pagedserve.request_id": new.request_id})
                self.traced[new.request_id] = _Traced(span)
        for req in (*plan.new_requests, *plan.continuing_requests):
            t = self.traced.get(req.request_id)
            if t is not None:
                t.steps += 1
                t.tokens += req.num_scheduled_tokens
                t.last_end_ns = end_ns

    def _end(self, request_id: str) -> None:
        t = self.traced.pop(request_id, None)
        if t is not None:
            t.span.set_attribute("pagedserve.steps", t.steps)
            t.span.set_attribute("pagedserve.tokens_computed", t.tokens)
            t.span.end(end_time=t.last_end_ns or None)

    def end_all(self) -> None:
        """A new stream: the scheduler will resend whatever it still runs."""
        for rid in list(self.traced):
            self._end(rid)
