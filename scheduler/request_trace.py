"""The scheduler's spans of each request (the trace's shape: pagedserve/tracing.py).

Built only when tracing is on (the step loop holds None otherwise). Everything is read from what
the step loop already has: the ScheduleRequest's traceparent at submit, the plan right after
`schedule()` (which requests got prompt tokens, which decode, which were preempted: a forgotten
id whose request is still unfinished), and the deltas after `apply_result()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pagedserve import tracing
from pagedserve.protos import executor_pb2
from pagedserve.scheduler.request import RequestStatus
from pagedserve.scheduler.scheduler import Scheduler


@dataclass
class _Traced:
    span: Any  # scheduler.request
    context: Any  # the context whose parent is `span`, for its children
    queued: Any | None = None  # open while it waits (for its first step, or after a preemption)
    decode: Any | None = None  # open from its first decode step to its end
    chunk: Any | None = None  # the prompt chunk of the step in flight
    decode_tokens: int = 0


class RequestTracer:
    def __init__(self, tracer: Any) -> None:
        self.tracer = tracer
        self.traced: dict[str, _Traced] = {}

    def _child(self, t: _Traced, name: str, **attributes: Any) -> Any:
        return self.tracer.start_span(name, context=t.context, attributes=attributes)

    def admitted(self, request_id: str, traceparent: str) -> None:
        from opentelemetry.trace import set_span_in_context

        span = self.tracer.start_span("scheduler.request",
                                      context=tracing.parent_context(traceparent),
                                      attributes={"pagedserve.request_id": request_id})
        t = _Traced(span, set_span_in_context(span))
        t.queued = self._child(t, "queued")
        self.traced[request_id] = t

    def planned(self, scheduler: Scheduler, plan: executor_pb2.StepPlan,
                split: list[tuple[str, int, int]]) -> None:
        """After schedule(), with the plan's request_split: new requests carry their span to the
        executor; chunks and decode spans open; preemptions are marked."""
        for rid in plan.forget_request_ids:
            t, req = self.traced.get(rid), scheduler.requests.get(rid)
            if t is not None and req is not None and req.status == RequestStatus.PREEMPTED:
                t.span.add_event("preempted", {"pagedserve.output_tokens": len(
                    req.output_token_ids)})
                t.queued = t.queued or self._child(t, "queued", **{"pagedserve.resumed": True})
        for new in plan.new_requests:
            t = self.traced.get(new.request_id)
            if t is not None:
                new.traceparent = tracing.traceparent_of(t.span)
        for rid, prefill, decode in split:
            t = self.traced.get(rid)
            if t is None:
                continue
            if t.queued is not None:
                t.queued.end()
                t.queued = None
            if prefill:
                t.chunk = self._child(t, "prefill", **{"pagedserve.tokens": prefill})
            if decode and t.decode is None:
                t.decode = self._child(t, "decode")
            t.decode_tokens += decode

    def applied(self, finished: dict[str, str]) -> None:
        """After apply_result(): the step's chunks end; finished requests (id -> reason) end."""
        for t in self.traced.values():
            if t.chunk is not None:
                t.chunk.end()
                t.chunk = None
        for rid, reason in finished.items():
            self.ended(rid, reason)

    def ended(self, request_id: str, reason: str) -> None:
        t = self.traced.pop(request_id, None)
        if t is None:
            return
        for child in (t.queued, t.chunk, t.decode):
            if child is not None:
                child.end()
        t.span.set_attribute("pagedserve.finish_reason", reason)
        t.span.set_attribute("pagedserve.decode_tokens", t.decode_tokens)
        t.span.end()
