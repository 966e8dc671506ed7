"""bench.soak's arithmetic on hand-made runs: requests fall into the window of their finish time
with the right percentiles and throughput, and memory growth is taken from the end of warm-up."""

from __future__ import annotations

from pagedserve.bench.serve import RequestResult
from pagedserve.bench.soak import growth, windows


def _result(ttft: float, e2e: float, tokens: int, ok: bool = True) -> RequestResult:
    return RequestResult(10, tokens, ok=ok, completion_tokens=tokens, ttft_s=ttft, e2e_s=e2e)


def test_windows_group_by_finish_time() -> None:
    start = 100.0
    done = [(start + 1, _result(0.1, 1.0, 10)), (start + 2, _result(0.3, 2.0, 30)),
            (start + 61, _result(0.2, 1.5, 20)), (start + 62, _result(0, 0, 0, ok=False))]
    rows = windows(done, start, 60.0)
    assert [(r["window"], r["requests"], r["errors"]) for r in rows] == [(0, 2, 0), (1, 2, 1)]
    assert rows[0]["ttft_p50_ms"] == 300.0 and rows[0]["e2e_p99_ms"] == 2000.0
    assert rows[0]["output_tokens_per_s"] == 40 / 60
    assert rows[1]["ttft_p99_ms"] == 200.0  # the failed request is not in the percentiles


def test_growth_starts_after_warm_up() -> None:
    samples = [{"t": t, "router": {"rss_mb": mb, "fds": 20, "threads": 9 + (t > 200)}}
               for t, mb in ((0, 50.0), (100, 80.0), (200, 100.0), (300, 104.0))]
    g = growth(samples, start=0.0, warmup_s=150.0)["router"]
    assert (g["rss_mb_after_warmup"], g["rss_mb_end"]) == (100.0, 104.0)
    assert g["rss_growth"] == 0.04 and g["threads"] == [9, 10] and g["fds"] == [20, 20]
