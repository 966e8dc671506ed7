"""Prometheus metrics through `prometheus_client`, the ecosystem's library, in one registry per
router (a process may hold several routers: the tests do).

The router counts what passes through it (requests, tokens, latencies); queue and KV-cache gauges,
and the step loop's time by phase (schedule, RPC, executor compute, apply), come from the
scheduler's Stats at scrape time, through a collector that reads the Stats of the scrape.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.openmetrics import exposition as openmetrics_exposition

from pagedserve.protos import scheduler_pb2

PREFIX = "pagedserve"
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                   7.5, 10.0, 20.0, 40.0, 80.0, 160.0)
ABORT_REASONS = ("client_disconnect", "cancelled")
OPENMETRICS_TYPE = openmetrics_exposition.CONTENT_TYPE_LATEST
# No `_created` series: a sample per counter that dashboards do not use (the library's default
# adds one; this is process-wide, and the router's process is ours).
prometheus_client.disable_created_metrics()


def _family(name: str, help: str, kind: str = "gauge",
            labels: Sequence[str] = ()) -> GaugeMetricFamily | CounterMetricFamily:
    cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
    return cls(f"{PREFIX}_{name}", help, labels=labels)


def _gauge(name: str, help: str, value: float, kind: str = "gauge") -> Metric:
    family = _family(name, help, kind)
    family.add_metric([], float(value))
    return family


def labelled(name: str, help: str, values: dict[str, float] | float,
             label: str = "replica") -> Metric:
    """A gauge (a counter when the name ends in _total), one sample per label value."""
    kind = "counter" if name.endswith("_total") else "gauge"
    if not isinstance(values, dict):
        return _gauge(name, help, values, kind)
    family = _family(name, help, kind, (label,))
    for key, value in values.items():
        family.add_metric([key], float(value))
    return family


class _ScrapeCollector:
    """The metrics known only at scrape time: the router's gauges, the scheduler's Stats and
    the replicas' families, as handed to Metrics.render."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.stats: scheduler_pb2.StatsResponse | None = None
        self.extra: Sequence[Metric] = ()

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        yield from self.extra
        yield _gauge("router_requests_in_flight", "Requests the router is serving.", m.in_flight)
        yield _gauge("router_requests_waiting",
                     "Requests admitted by the router that have no first token yet.", m.waiting)
        yield _gauge("scheduler_up", "1 when the scheduler answered Stats.",
                     self.stats is not None)
        if self.stats is not None:
            yield from _scheduler_gauges(self.stats)


class Metrics:
    """The router's metrics; one instance (and registry) per router."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry

        def counter(name: str, help: str, labels: Sequence[str] = ()) -> Counter:
            return Counter(f"{PREFIX}_{name}", help, labels, registry=reg)

        def histogram(name: str, help: str) -> Histogram:
            return Histogram(f"{PREFIX}_{name}", help, buckets=LATENCY_BUCKETS, registry=reg)

        self.requests = counter("requests_total", "API requests received.", ("endpoint",))
        self.finished = counter("request_success_total", "Choices finished, by finish reason.",
                                ("finish_reason",))
        self.failed = counter("request_failure_total", "API requests that ended in an error.",
                              ("code",))
        self.aborted = counter("request_abort_total", "API requests abandoned by the client "
                               "before their answer was done, by reason: client_disconnect (an "
                               "HTTP client went away), cancelled (a gRPC call was cancelled or "
                               "ran past its deadline).", ("reason",))
        for reason in ABORT_REASONS:  # known reasons start at 0: a rate exists before the first
            self.aborted.labels(reason=reason)
        self.prompt_tokens = counter("prompt_tokens_total", "Prompt tokens processed.")
        self.generation_tokens = counter("generation_tokens_total", "Tokens generated.")
        self.ttft = histogram("time_to_first_token_seconds", "Time to the first output token.")
        self.e2e = histogram("e2e_request_latency_seconds", "Time from request to last token.")
        self.tpot = histogram("time_per_output_token_seconds",
                              "Per sequence: (last token - first token) / (output tokens - 1).")
        self.itl = histogram("inter_token_latency_seconds",
                             "Between a sequence's successive output tokens (a message carrying "
                             "k tokens counts its gap k times, as gap / k).")
        self.in_flight = 0
        self.waiting = 0  # admitted, no first token yet (the router's queue limit counts these)
        self._scrape = _ScrapeCollector(self)
        reg.register(self._scrape)

    def render(self, stats: scheduler_pb2.StatsResponse | None,
               extra: Sequence[Metric] = (), openmetrics: bool = False) -> str:
        """The exposition text; extra: families of other sources (the scheduler replicas',
        router/replicas.py). openmetrics: that format, the one that carries exemplars (latency
        buckets linked to trace ids when tracing is on). Scrapes run on the event loop, one at
        a time."""
        self._scrape.stats, self._scrape.extra = stats, extra
        if openmetrics:
            return openmetrics_exposition.generate_latest(self.registry).decode()
        return generate_latest(self.registry).decode()


def _scheduler_gauges(s: scheduler_pb2.StatsResponse) -> list[Metric]:
    usage = s.blocks_used / s.blocks_total if s.blocks_total else 0.0
    return [
        _gauge("num_requests_waiting", "Requests waiting in the scheduler.", s.num_waiting),
        _gauge("num_requests_running", "Requests running in the scheduler.", s.num_running),
        _gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0 to 1).", usage),
        _gauge("kv_cache_blocks_total", "KV-cache blocks in the pool.", s.blocks_total),
        _gauge("kv_cache_blocks_free", "KV-cache blocks free.", s.blocks_free),
        _gauge("num_preemptions_total", "Preemptions so far.", s.num_preemptions, "counter"),
        _gauge("prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache.",
               s.prefix_cache_queries, "counter"),
        _gauge("prefix_cache_hits_total", "Prompt tokens found in the prefix cache.",
               s.prefix_cache_hits, "counter"),
        _gauge("prefix_cache_hit_rate", "Prefix-cache hit rate.", s.prefix_cache_hit_rate),
        _gauge("executor_connected", "1 when the scheduler has an executor.",
               s.executor_connected),
        _gauge("scheduler_steps_total", "Scheduler steps so far.", s.steps, "counter"),
        _gauge("spec_decode_num_draft_tokens_total", "Speculative tokens proposed.",
               s.spec_draft_tokens, "counter"),
        _gauge("spec_decode_num_accepted_tokens_total", "Speculative tokens accepted.",
               s.spec_accepted_tokens, "counter"),
        _gauge("spec_decode_num_drafts_total", "Proposals verified (one per request per step).",
               s.spec_verifications, "counter"),
        *_step_counters(s),
    ]


def _step_counters(s: scheduler_pb2.StatsResponse) -> list[Metric]:
    """Where the scheduler's steps spent their time (rpc - execute: transport and serialization)."""
    seconds = (("schedule", "in the scheduler's schedule()", s.step_schedule_seconds),
               ("rpc", "from sending a step plan to receiving its result",
                s.step_rpc_seconds),
               ("execute", "computing step plans, as the executor measured it",
                s.step_execute_seconds),
               ("apply", "applying step results and streaming them out", s.step_apply_seconds))
    families = [_gauge(f"step_{phase}_seconds_total", f"Seconds {what}, over all steps.", value,
                       "counter") for phase, what, value in seconds]
    return [*families, _gauge("step_running_requests_total",
                              "Requests in each step's plan, summed over steps (divided by "
                              "scheduler_steps_total: the mean batch).",
                              s.step_running_requests_sum, "counter")]
