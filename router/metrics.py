"""Prometheus metrics in the text exposition format, written by hand (no client library needed).

The router counts what passes through it (requests, tokens, latencies); queue and KV-cache gauges,
and the step loop's time by phase (schedule, RPC, executor compute, apply), come from the
scheduler's Stats at scrape time.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from pagedserve.protos import scheduler_pb2

PREFIX = "pagedserve"
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                   7.5, 10.0, 20.0, 40.0, 80.0, 160.0)
ABORT_REASONS = ("client_disconnect", "cancelled")


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(x: float) -> str:
    return repr(float(x)) if isinstance(x, float) and not x.is_integer() else str(int(x))


class Counter:
    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        self.name, self.help, self.labelnames = f"{PREFIX}_{name}", help, tuple(labelnames)
        self.values: dict[tuple[str, ...], float] = {} if labelnames else {(): 0.0}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(str(labels[n]) for n in self.labelnames)
        self.values[key] = self.values.get(key, 0.0) + amount

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        for key, value in sorted(self.values.items()):
            lines.append(f"{self.name}{_labels(self.labelnames, key)} {_num(value)}")
        return lines


class Histogram:
    def __init__(self, name: str, help: str, buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.name, self.help, self.buckets = f"{PREFIX}_{name}", help, tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last is +Inf
        self.sum = 0.0

    def observe(self, value: float, times: int = 1) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += times
        self.sum += value * times

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        total = 0
        for bound, count in zip((*self.buckets, float("inf")), self.counts):
            total += count
            le = "+Inf" if bound == float("inf") else repr(bound)
            lines.append(f'{self.name}_bucket{{le="{le}"}} {total}')
        lines += [f"{self.name}_sum {self.sum!r}", f"{self.name}_count {total}"]
        return lines


def _gauge(name: str, help: str, value: float, kind: str = "gauge") -> list[str]:
    full = f"{PREFIX}_{name}"
    return [f"# HELP {full} {help}", f"# TYPE {full} {kind}", f"{full} {_num(value)}"]


def labelled(name: str, help: str, values: dict[str, float] | float,
             label: str = "replica") -> list[str]:
    """A gauge (a counter when the name ends in _total), one sample per label value."""
    full = f"{PREFIX}_{name}"
    kind = "counter" if name.endswith("_total") else "gauge"
    lines = [f"# HELP {full} {help}", f"# TYPE {full} {kind}"]
    samples = values.items() if isinstance(values, dict) else [(None, values)]
    for key, value in samples:
        lines.append(f"{full}{_labels((label,), (key,)) if key is not None else ''} "
                     f"{_num(value)}")
    return lines


class Metrics:
    """The router's metrics; one instance per router process."""

    def __init__(self) -> None:
        self.requests = Counter("requests_total", "API requests received.", ("endpoint",))
        self.finished = Counter("request_success_total", "Choices finished, by finish reason.",
                                ("finish_reason",))
        self.failed = Counter("request_failure_total", "API requests that ended in an error.",
                              ("code",))
        # Known reasons start at 0, so a rate over them exists before the first abort.
        self.aborted = Counter("request_abort_total", "API requests abandoned by the client before "
                               "their answer was done, by reason: client_disconnect (an HTTP "
                               "client went away), cancelled (a gRPC call was cancelled or ran "
                               "past its deadline).", ("reason",))
        for reason in ABORT_REASONS:
            self.aborted.inc(0, reason=reason)
        self.prompt_tokens = Counter("prompt_tokens_total", "Prompt tokens processed.")
        self.generation_tokens = Counter("generation_tokens_total", "Tokens generated.")
        self.ttft = Histogram("time_to_first_token_seconds", "Time to the first output token.")
        self.e2e = Histogram("e2e_request_latency_seconds", "Time from request to last token.")
        self.tpot = Histogram("time_per_output_token_seconds",
                              "Per sequence: (last token - first token) / (output tokens - 1).")
        self.itl = Histogram("inter_token_latency_seconds",
                             "Between a sequence's successive output tokens (a message carrying "
                             "k tokens counts its gap k times, as gap / k).")
        self.in_flight = 0
        self.waiting = 0  # admitted, no first token yet (the router's queue limit counts these)

    def render(self, stats: scheduler_pb2.StatsResponse | None,
               extra: Sequence[str] = ()) -> str:
        """extra: lines of other sources (the scheduler replicas', router/replicas.py)."""
        lines: list[str] = list(extra)
        for metric in (self.requests, self.finished, self.failed, self.aborted,
                       self.prompt_tokens, self.generation_tokens, self.ttft, self.e2e,
                       self.tpot, self.itl):
            lines += metric.render()
        lines += _gauge("router_requests_in_flight", "Requests the router is serving.",
                        self.in_flight)
        lines += _gauge("router_requests_waiting",
                        "Requests admitted by the router that have no first token yet.",
                        self.waiting)
        lines += _gauge("scheduler_up", "1 when the scheduler answered Stats.", stats is not None)
        if stats is not None:
            lines += _scheduler_gauges(stats)
        return "\n".join(lines) + "\n"


def _scheduler_gauges(s: scheduler_pb2.StatsResponse) -> list[str]:
    usage = s.blocks_used / s.blocks_total if s.blocks_total else 0.0
    return [
        *_gauge("num_requests_waiting", "Requests waiting in the scheduler.", s.num_waiting),
        *_gauge("num_requests_running", "Requests running in the scheduler.", s.num_running),
        *_gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0 to 1).", usage),
        *_gauge("kv_cache_blocks_total", "KV-cache blocks in the pool.", s.blocks_total),
        *_gauge("kv_cache_blocks_free", "KV-cache blocks free.", s.blocks_free),
        *_gauge("num_preemptions_total", "Preemptions so far.", s.num_preemptions, "counter"),
        *_gauge("prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache.",
                s.prefix_cache_queries, "counter"),
        *_gauge("prefix_cache_hits_total", "Prompt tokens found in the prefix cache.",
                s.prefix_cache_hits, "counter"),
        *_gauge("prefix_cache_hit_rate", "Prefix-cache hit rate.", s.prefix_cache_hit_rate),
        *_gauge("executor_connected", "1 when the scheduler has an executor.",
                s.executor_connected),
        *_gauge("scheduler_steps_total", "Scheduler steps so far.", s.steps, "counter"),
        *_gauge("spec_decode_num_draft_tokens_total", "Speculative tokens proposed.",
                s.spec_draft_tokens, "counter"),
        *_gauge("spec_decode_num_accepted_tokens_total", "Speculative tokens accepted.",
                s.spec_accepted_tokens, "counter"),
        *_gauge("spec_decode_num_drafts_total", "Proposals verified (one per request per step).",
                s.spec_verifications, "counter"),
        *_step_counters(s),
    ]


def _step_counters(s: scheduler_pb2.StatsResponse) -> list[str]:
    """Where the scheduler's steps spent their time (rpc - execute: transport and serialization)."""
    seconds = (("schedule", "in the scheduler's schedule()", s.step_schedule_seconds),
               ("rpc", "from sending a step plan to receiving its result",
                s.step_rpc_seconds),
               ("execute", "computing step plans, as the executor measured it",
                s.step_execute_seconds),
               ("apply", "applying step results and streaming them out", s.step_apply_seconds))
    lines = []
    for phase, what, value in seconds:
        lines += _gauge(f"step_{phase}_seconds_total", f"Seconds {what}, over all steps.", value,
                        "counter")
    return lines + _gauge("step_running_requests_total",
                          "Requests in each step's plan, summed over steps (divided by "
                          "scheduler_steps_total: the mean batch).",
                          s.step_running_requests_sum, "counter")
