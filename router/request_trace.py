"""The router's span of one API request (pagedserve/tracing.py draws the whole trace).

The client's own W3C `traceparent` (an HTTP header, or gRPC call metadata) is read where the
request comes in and held in a context variable, so RouterCore.stream, which starts the span, needs
no new argument on every path that reaches it.
"""

from __future__ import annotations

import contextvars
from typing import Any

from pagedserve import tracing

client_traceparent: contextvars.ContextVar[str] = contextvars.ContextVar(
    "client_traceparent", default="")


class RequestSpan:
    """`pagedserve.request`, or nothing at all when tracing is off."""

    def __init__(self, request_id: str, endpoint: str, num_choices: int) -> None:
        self.span: Any = None
        tracer = tracing.tracer()
        if tracer is None:
            return
        from opentelemetry.trace import SpanKind

        self.span = tracer.start_span(
            "pagedserve.request", context=tracing.parent_context(client_traceparent.get()),
            kind=SpanKind.SERVER, attributes={"pagedserve.request_id": request_id,
                                              "pagedserve.endpoint": endpoint,
                                              "pagedserve.choices": num_choices})

    @property
    def traceparent(self) -> str:
        """What the scheduler requests carry ("" when tracing is off)."""
        return tracing.traceparent_of(self.span) if self.span is not None else ""

    @property
    def exemplar(self) -> dict[str, str] | None:
        """A latency observation's link to this trace (OpenMetrics exemplars), when traced."""
        if self.span is None:
            return None
        return {"trace_id": format(self.span.get_span_context().trace_id, "032x")}

    def end(self, *, prompt_tokens: int, completion_tokens: int, error: str = "") -> None:
        if self.span is None:
            return
        self.span.set_attribute("pagedserve.prompt_tokens", prompt_tokens)
        self.span.set_attribute("pagedserve.completion_tokens", completion_tokens)
        if error:
            from opentelemetry.trace import Status, StatusCode

            self.span.set_status(Status(StatusCode.ERROR, error))
        self.span.end()
