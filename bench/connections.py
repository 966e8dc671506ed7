"""Thousands of streaming connections on one router at once (issue 23: load).

    python -m pagedserve.bench.connections --model DIR [--connections 2000] [--max-queued 1024]
    python -m pagedserve.bench.connections --base-url http://127.0.0.1:8000 --connections 2000

Opens every connection at the same moment, each a streamed completion of exactly --max-tokens
tokens (ignore_eos), and holds them all: the admitted ones stream (those past the scheduler's
max_num_seqs wait in its queue with their connection open), and those past the router's
--max-queued-requests are refused with 429 and a Retry-After. It reports how many streamed to the
end with exactly the tokens asked, how many were refused and how, any other outcome (an error:
the target is none), the most connections open at one moment, and the server's processes' open
file descriptors and threads before and after (a leak shows as growth). With --model it launches
`pagedserve serve` itself (with --max-queued-requests as given). Results: results/connections.json.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pagedserve.bench.results import write_results
from pagedserve.bench.serve import RequestResult, launched_server, send_request
from pagedserve.bench.server_processes import process_figures, process_names, server_processes


@dataclass
class Outcomes:
    kinds: Counter = field(default_factory=Counter)  # completed, refused_429, error:...
    open_now: int = 0
    open_peak: int = 0
    retry_after_missing: int = 0


async def _one(url: str, payload: dict, out: Outcomes) -> None:
    out.open_now += 1
    out.open_peak = max(out.open_peak, out.open_now)
    try:
        r = await send_request(url, payload, RequestResult(0, payload["max_tokens"]))
    finally:
        out.open_now -= 1
    if r.http_status == 429:
        kind = "refused_429"
        out.retry_after_missing += r.retry_after is None
    elif r.ok and r.completion_tokens == payload["max_tokens"]:
        kind = "completed"
    else:
        kind = f"error:{r.error[:80] or f'{r.completion_tokens} tokens'}"
    out.kinds[kind] += 1


async def hold(base_url: str, connections: int, max_tokens: int) -> tuple[Outcomes, float]:
    payload = {"model": "", "prompt": "Count with me: one two three", "max_tokens": max_tokens,
               "temperature": 0, "ignore_eos": True, "stream": True,
               "stream_options": {"include_usage": True}}
    out, start = Outcomes(), time.perf_counter()
    await asyncio.gather(*(_one(f"{base_url}/v1/completions", payload, out)
                           for _ in range(connections)))
    return out, time.perf_counter() - start


def _resources(pids: list[int]) -> dict[str, dict[str, float]]:
    """Per process ("name:pid"): resident MB, open file descriptors and threads."""
    names = process_names(pids)
    figures = {pid: process_figures(pid) for pid in names}
    return {f"{names[pid]}:{pid}": f for pid, f in figures.items() if f is not None}


def run(base_url: str, args: argparse.Namespace) -> dict:
    pids = server_processes(base_url)
    before = _resources(pids)
    out, seconds = asyncio.run(hold(base_url, args.connections, args.max_tokens))
    time.sleep(2.0)  # let the server close what the run left
    return {"connections": args.connections, "max_tokens": args.max_tokens,
            "seconds": round(seconds, 2), "outcomes": dict(out.kinds),
            "open_peak": out.open_peak, "retry_after_missing": out.retry_after_missing,
            "resources_before": before, "resources_after": _resources(pids)}


def print_table(r: dict) -> None:
    print(f"{r['connections']} connections, {r['max_tokens']} tokens each, "
          f"{r['seconds']} s, at most {r['open_peak']} open at once")
    for kind, n in sorted(r["outcomes"].items()):
        print(f"  {kind:40} {n}")
    print(f"  429s without Retry-After                  {r['retry_after_missing']}")
    for name, after in r["resources_after"].items():
        b = r["resources_before"].get(name, {})
        print(f"  {name:28} fds {b.get('fds')} -> {after['fds']}, "
              f"threads {b.get('threads')} -> {after['threads']}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default=None)
    p.add_argument("--model", default=None, help="launch `pagedserve serve` on this model")
    p.add_argument("--connections", type=int, default=2000)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-queued", type=int, default=1024,
                   help="the launched server's --max-queued-requests")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--kv-cache-memory-bytes", type=int, default=0)
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--out", default="results/connections.json")
    args = p.parse_args(argv)
    if (args.base_url is None) == (args.model is None):
        p.error("give exactly one of --base-url and --model")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4 * args.connections)), hard))
    if args.model is not None:
        args.extra_serve_args = ["--max-queued-requests", str(args.max_queued)]
        with launched_server(args.model, args) as base_url:
            result = run(base_url, args)
    else:
        result = run(args.base_url, args)
    print_table(result)
    write_results(Path(args.out), result)
    return 0 if not any(k.startswith("error") for k in result["outcomes"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
