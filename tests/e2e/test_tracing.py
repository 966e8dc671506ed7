"""OpenTelemetry traces of a real `serve`: each request is one trace across the router, the
scheduler and the executor, with the parent links pagedserve/tracing.py draws, received here by a
small OTLP/HTTP collector that decodes what the three processes export (the protobuf messages of
the `opentelemetry-proto` package). With tracing off, no process loads the SDK."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)

from tests.conftest import ROOT
from tests.e2e.conftest import running_serve

CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"


class Collector(ThreadingHTTPServer):
    """Spans received: (service name, span) in arrival order."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.spans: list[tuple[str, object]] = []
        self.lock = threading.Lock()


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        request = ExportTraceServiceRequest.FromString(body)
        with self.server.lock:  # type: ignore[attr-defined]
            for resource_spans in request.resource_spans:
                attrs = {a.key: a.value.string_value
                         for a in resource_spans.resource.attributes}
                for scope in resource_spans.scope_spans:
                    self.server.spans += [(attrs["service.name"], s) for s in scope.spans]
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_each_request_is_one_trace_across_the_three_processes(llama_dir: Path,
                                                              tmp_path: Path) -> None:
    collector = Collector()
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{collector.server_address[1]}/v1/traces"
    args = [str(llama_dir), "--dtype", "float32", "--num-kv-blocks", "64",
            "--max-model-len", "256", "--grpc-port", "-1", "--otlp-traces-endpoint", endpoint]
    try:
        with running_serve(args, tmp_path / "serve.log", llama_dir,
                           env={"OTEL_BSP_SCHEDULE_DELAY": "100"}) as serve:
            body = {"model": "", "prompt": "Once upon a time", "max_tokens": 5,
                    "temperature": 0, "ignore_eos": True}
            traced = httpx.post(f"{serve.base_url}/v1/completions", json=body, timeout=60,
                                headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"})
            plain = httpx.post(f"{serve.base_url}/v1/completions", json=body, timeout=60)
            assert traced.status_code == plain.status_code == 200
            metrics = httpx.get(f"{serve.base_url}/metrics", timeout=30,
                                headers={"accept": "application/openmetrics-text"})
    finally:  # serve has exited: every process flushed its spans on the way out
        collector.shutdown()
    traces = defaultdict(list)
    for service, span in collector.spans:
        traces[span.trace_id.hex()].append((service, span))
    assert len(traces) == 2, {t: [s.name for _, s in v] for t, v in traces.items()}
    assert CLIENT_TRACE in traces  # the client's trace is continued, not a new one
    # latency buckets link to the traces (OpenMetrics exemplars: a bucket keeps its latest)
    exemplars = {s.exemplar.labels["trace_id"]
                 for f in openmetrics_families(metrics.text) for s in f.samples
                 if s.name == "pagedserve_time_to_first_token_seconds_bucket" and s.exemplar}
    assert exemplars and exemplars <= set(traces), (exemplars, set(traces))
    for trace_id, spans in traces.items():
        _check_one_request(spans, client_parent=CLIENT_SPAN if trace_id == CLIENT_TRACE else "")


def _check_one_request(spans: list, client_parent: str) -> None:
    by_name = defaultdict(list)
    for service, span in spans:
        by_name[span.name].append((service, span))
    names = {n: [svc for svc, _ in v] for n, v in by_name.items()}
    assert names["pagedserve.request"] == ["pagedserve-router"], names
    assert names["scheduler.request"] == ["pagedserve-scheduler"], names
    assert names["executor.request"] == ["pagedserve-executor"], names
    (_, router), = by_name["pagedserve.request"]
    (_, scheduler), = by_name["scheduler.request"]
    (_, executor), = by_name["executor.request"]
    assert router.parent_span_id.hex() == client_parent
    assert scheduler.parent_span_id == router.span_id
    assert executor.parent_span_id == scheduler.span_id
    for child in ("queued", "prefill", "decode"):
        assert by_name[child], f"no {child} span: {names}"
        assert all(s.parent_span_id == scheduler.span_id for _, s in by_name[child])
    steps = {a.key: a.value.int_value for a in executor.attributes}
    # one prompt step, then a step per further token (5 tokens: the first comes with the prompt)
    assert steps["pagedserve.steps"] == 5 and steps["pagedserve.tokens_computed"] >= 5 + 4
    assert router.start_time_unix_nano <= scheduler.start_time_unix_nano \
        <= executor.start_time_unix_nano <= executor.end_time_unix_nano


def test_with_tracing_off_no_process_loads_the_sdk() -> None:
    """The scheduler's and executor's servers import no OpenTelemetry at all; the router (whose
    FastAPI imports the API) never the SDK; and their hooks are None."""
    code = """
import sys
from pagedserve import tracing
tracing.configure("x")
from pagedserve.executor.server import ExecutorService
from pagedserve.scheduler.step_loop import StepLoop
assert ExecutorService()._trace is None and StepLoop("unix:///nowhere").trace is None
assert not [m for m in sys.modules if m.startswith("opentelemetry")], "scheduler/executor"
from pagedserve.router.request_trace import RequestSpan
import pagedserve.router.app
assert RequestSpan("r", "completions", 1).traceparent == ""
assert not [m for m in sys.modules if m.startswith("opentelemetry.sdk")], "router"
"""
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr
