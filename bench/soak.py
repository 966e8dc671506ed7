"""Soak: the serving load held for a long time, watching each process for leaks (issue 23).

    python -m pagedserve.bench.soak --model DIR [--minutes 30] [--load 0.8] [--window-minutes 5]

Launches `pagedserve serve`, measures its saturated request rate (bench.serve's ShareGPT-like
requests, all at once), then sends requests as a Poisson process at --load of that rate for
--minutes. Every --sample-s seconds it records each process's resident memory, open file
descriptors and threads; per --window-minutes it reports the requests finished, their TTFT and
end-to-end latency percentiles and the output tokens per second. After the run it lets the server
drain and reads the KV pool's free blocks. Memory growth is measured from the end of the first
window (warm-up) to the end. Results: results/soak.json, and a plot (results/soak.png) when
matplotlib is installed.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from dataclasses import asdict
from pathlib import Path

from pagedserve.bench.results import write_results
from pagedserve.bench.serve import (
    RequestResult,
    _payload,
    build_prompts,
    launched_server,
    run_rate,
    send_request,
)
from pagedserve.bench.server_processes import process_figures, process_names, server_processes
from pagedserve.bench.workload import sharegpt_like


async def _sample(pids: list[int], every_s: float, until: float, out: list[dict]) -> None:
    names = process_names(pids)
    while time.monotonic() < until:
        row = {"t": time.monotonic()}
        for pid in pids:
            figures = process_figures(pid)
            if figures is not None:
                row[names[pid]] = figures
        out.append(row)
        await asyncio.sleep(every_s)


async def _load(url: str, prompts: list, requests: list, rate: float, until: float,
                done: list[tuple[float, RequestResult]]) -> None:
    rng, tasks, i = random.Random(1), [], 0

    async def one(k: int) -> None:
        r = requests[k % len(requests)]
        result = RequestResult(len(r.prompt_token_ids), r.output_len)
        await send_request(url, _payload("", prompts[k % len(prompts)], r.output_len), result)
        done.append((time.monotonic(), result))

    while time.monotonic() < until:
        tasks.append(asyncio.create_task(one(i)))
        i += 1
        await asyncio.sleep(rng.expovariate(rate))
    await asyncio.gather(*tasks)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def windows(done: list[tuple[float, RequestResult]], start: float, window_s: float) -> list[dict]:
    """Per window of finish times: requests, errors, TTFT and e2e percentiles, output tok/s."""
    rows: dict[int, list[RequestResult]] = {}
    for t, r in done:
        rows.setdefault(int((t - start) // window_s), []).append(r)
    out = []
    for w in sorted(rows):
        rs = rows[w]
        ok = [r for r in rs if r.ok]
        out.append({"window": w, "requests": len(rs), "errors": len(rs) - len(ok),
                    "ttft_p50_ms": 1000 * _pct([r.ttft_s for r in ok], 0.5),
                    "ttft_p99_ms": 1000 * _pct([r.ttft_s for r in ok], 0.99),
                    "e2e_p50_ms": 1000 * _pct([r.e2e_s for r in ok], 0.5),
                    "e2e_p99_ms": 1000 * _pct([r.e2e_s for r in ok], 0.99),
                    "output_tokens_per_s": sum(r.completion_tokens for r in ok) / window_s})
    return out


def growth(samples: list[dict], start: float, warmup_s: float) -> dict[str, dict]:
    """Per process: RSS after warm-up and at the end, its growth, fds and threads first/last."""
    after = [s for s in samples if s["t"] - start >= warmup_s] or samples
    out = {}
    for name in after[0]:
        if name == "t":
            continue
        first, last = after[0][name], after[-1].get(name, after[0][name])
        out[name] = {"rss_mb_after_warmup": round(first["rss_mb"], 1),
                     "rss_mb_end": round(last["rss_mb"], 1),
                     "rss_growth": round(last["rss_mb"] / first["rss_mb"] - 1, 4),
                     "fds": [first["fds"], last["fds"]],
                     "threads": [first["threads"], last["threads"]]}
    return out


def _kv_blocks(base_url: str) -> tuple[float, float]:
    """(free, total) KV blocks, from /metrics."""
    import urllib.request

    with urllib.request.urlopen(f"{base_url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line.startswith("pagedserve_kv_cache_blocks_")}
    return values["pagedserve_kv_cache_blocks_free"], values["pagedserve_kv_cache_blocks_total"]


async def _soak(base_url: str, prompts: list, requests: list, rate: float,
                args: argparse.Namespace) -> tuple[list, list, float]:
    start = time.monotonic()
    until = start + 60 * args.minutes
    samples: list[dict] = []
    done: list[tuple[float, RequestResult]] = []
    await asyncio.gather(
        _sample(server_processes(base_url), args.sample_s, until, samples),
        _load(f"{base_url}/v1/completions", prompts, requests, rate, until, done))
    return samples, done, start


def run(base_url: str, args: argparse.Namespace) -> dict:
    requests = sharegpt_like(args.num_requests, args.vocab_size, seed=3)
    prompts = build_prompts(args.model, requests, "ids")
    saturated = asyncio.run(run_rate(base_url, "", prompts, requests, float("inf"), None, 0))
    rate = args.load * saturated["request_throughput"]
    samples, done, start = asyncio.run(_soak(base_url, prompts, requests, rate, args))
    time.sleep(5.0)  # the last requests drain
    free, total = _kv_blocks(base_url)
    return {"minutes": args.minutes, "load": args.load,
            "saturated_requests_per_s": saturated["request_throughput"],
            "rate_requests_per_s": rate, "requests": len(done),
            "errors": sum(not r.ok for _, r in done),
            "windows": windows(done, start, 60 * args.window_minutes),
            "processes": growth(samples, start, 60 * args.window_minutes),
            "kv_blocks_free_after": free, "kv_blocks_total": total,
            "samples": samples, "first_error": next((asdict(r)["error"] for _, r in done
                                                      if not r.ok), "")}


def print_report(r: dict) -> None:
    print(f"soak: {r['minutes']} min at {r['load']:.0%} of saturation "
          f"({r['rate_requests_per_s']:.2f} of {r['saturated_requests_per_s']:.2f} req/s); "
          f"{r['requests']} requests, {r['errors']} errors")
    print("window  requests  errors  TTFT p50/p99 ms  e2e p50/p99 ms  out tok/s")
    for w in r["windows"]:
        print(f"{w['window']:6}  {w['requests']:8}  {w['errors']:6}  "
              f"{w['ttft_p50_ms']:7.0f}/{w['ttft_p99_ms']:<7.0f}  "
              f"{w['e2e_p50_ms']:6.0f}/{w['e2e_p99_ms']:<7.0f}  {w['output_tokens_per_s']:8.1f}")
    for name, p in r["processes"].items():
        print(f"{name:10} RSS {p['rss_mb_after_warmup']} -> {p['rss_mb_end']} MB "
              f"({p['rss_growth']:+.1%}), fds {p['fds']}, threads {p['threads']}")
    print(f"KV blocks free after: {r['kv_blocks_free_after']:.0f} of {r['kv_blocks_total']:.0f}")


def plot(r: dict, path: Path) -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    t0 = r["samples"][0]["t"]
    for name in r["processes"]:
        pts = [(s["t"] - t0, s[name]["rss_mb"]) for s in r["samples"] if name in s]
        ax.plot([p[0] / 60 for p in pts], [p[1] for p in pts], label=name)
    ax.set_xlabel("minutes")
    ax.set_ylabel("resident MB")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return True


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--window-minutes", type=float, default=5.0)
    p.add_argument("--load", type=float, default=0.8, help="share of the saturated rate")
    p.add_argument("--sample-s", type=float, default=10.0)
    p.add_argument("--num-requests", type=int, default=200, help="the workload's requests")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--kv-cache-memory-bytes", type=int, default=0)
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--out", default="results/soak.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from pagedserve.executor.model_config import ModelConfig

    args = parse_args(argv)
    args.vocab_size = ModelConfig.from_dir(args.model).vocab_size
    with launched_server(args.model, args) as base_url:
        result = run(base_url, args)
    print_report(result)
    write_results(Path(args.out), result)
    if plot(result, Path(args.out).with_suffix(".png")):
        print(f"plot: {Path(args.out).with_suffix('.png')}")
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
