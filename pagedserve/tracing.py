"""OpenTelemetry traces across the three processes, off unless `--otlp-traces-endpoint` is given.

One request is one trace:

    pagedserve.request            router: HTTP or gRPC call to last token (child of the client's
    |                             W3C `traceparent`, when it sent one)
    +- scheduler.request          scheduler: admission to finish
       +- queued                  waiting for its first step (again after each preemption)
       +- prefill                 one per prompt chunk: the step that computed it
       +- decode                  first decode step to finish
       +- executor.request        executor: the steps it took part in, aggregated into one span
                                  (step and token counts), not one span per step

The context crosses processes as a `traceparent` string inside the messages
(ScheduleRequest.traceparent, NewRequest.traceparent): the router's requests share one
multiplexed Session stream and the scheduler's one Execute stream, so call metadata cannot carry
one per request. The public gRPC API takes the client's `traceparent` from call metadata.

The endpoint travels to `serve`'s children in PAGEDSERVE_OTLP_TRACES_ENDPOINT (set by the CLI).
Without it `tracer()` is None, every hook is skipped, and the SDK is never imported.
"""

from __future__ import annotations

import atexit
import os
from typing import Any

ENV_VAR = "PAGEDSERVE_OTLP_TRACES_ENDPOINT"
_state: dict[str, Any] = {}


def set_endpoint(endpoint: str) -> None:
    """For this process and every child it starts."""
    if not endpoint.startswith(("http://", "https://")):
        raise ValueError(f"--otlp-traces-endpoint: expected an http(s) URL, got {endpoint!r}")
    os.environ[ENV_VAR] = endpoint


def configure(service: str) -> None:
    """Starts exporting this process's spans as `service` when the endpoint is set (OTLP over
    HTTP, in batches; flushed at exit)."""
    endpoint = os.environ.get(ENV_VAR)
    if not endpoint or "tracer" in _state:
        return
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as e:
        raise ValueError(f"--otlp-traces-endpoint: the OpenTelemetry SDK is not installed "
                         f"({e.name}): pip install 'pagedserve[tracing]'") from None

    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    atexit.register(provider.shutdown)
    _state["provider"] = provider
    _state["tracer"] = provider.get_tracer("pagedserve")


def tracer() -> Any | None:
    """This process's tracer, or None when tracing is off."""
    return _state.get("tracer")


def shutdown() -> None:
    """Exports what is still buffered (a server calls it on its way out)."""
    provider = _state.get("provider")
    if provider is not None:
        provider.force_flush()


def parent_context(traceparent: str) -> Any | None:
    """The context a W3C traceparent names (None for an empty or malformed one)."""
    if not traceparent:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract({"traceparent": traceparent}) or None


def traceparent_of(span: Any) -> str:
    """The W3C traceparent of a span, for the next process."""
    from opentelemetry.trace import set_span_in_context
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier, context=set_span_in_context(span))
    return carrier.get("traceparent", "")
