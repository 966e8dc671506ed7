"""Serving benchmark: a running server driven over HTTP (OpenAI completions, streamed).

    python -m pagedserve.bench.serve --launch [--model DIR] [--request-rates 1,2,4,inf] [--compare-offline]
    python -m pagedserve.bench.serve --base-url http://127.0.0.1:8000 --request-rate inf
    pagedserve bench serve ...

The workload is bench.workload's ShareGPT-like requests (the same ones bench.throughput serves):
each request asks for exactly its output length (max_tokens, ignore_eos). Prompts go as token ids
(`--prompt-format ids`, exact lengths) or as the text the model's tokenizer decodes them to
(`text`); each rate of a sweep gets its own prompt ids (same lengths), so no run finds an earlier
run's prompts in the prefix cache. Requests arrive as a Poisson process at --request-rate per
second, or all at once (inf), with at most --max-concurrency in flight. Per request it records the
time to the first token (TTFT), the gaps between streamed chunks (ITL), the time per output token
after the first (TPOT) and the end-to-end latency; it reports their mean, median and p99, and
request and output-token throughput over the whole run. With several rates it sweeps them and
plots latency and throughput against rate (PNG, matplotlib). --launch starts `pagedserve serve`
on a free port, waits until it is healthy, runs, and stops it; --compare-offline then serves the
saturated run's requests through the offline `LLM` in this process (the server stopped) and prints
serving's share of it. --rounds N alternates the two N times (a fresh server and fresh prompts
each round) and reports the round with the median share: one pair of runs on a shared machine
can be off by a quarter.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pagedserve.bench.results import write_results
from pagedserve.bench.sse_client import HTTPStatusError, stream_events
from pagedserve.bench.workload import BenchRequest, sharegpt_like

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class RequestResult:
    prompt_len: int
    output_len: int  # asked for
    ok: bool = False
    error: str = ""
    completion_tokens: int = 0
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    http_status: int = 200  # a refusal's status (bench.connections counts 429s)
    retry_after: str | None = None  # a refusal's Retry-After header

    @property
    def tpot_s(self) -> float | None:
        if self.completion_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.completion_tokens - 1)


# ---- one request ------------------------------------------------------------------------------


def _payload(model: str, prompt: str | list[int], output_len: int) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}


async def send_request(url: str, payload: dict, result: RequestResult) -> RequestResult:
    """Streams one completion: chunk times, then the usage chunk's completion_tokens."""
    start, last = time.perf_counter(), None
    try:
        async for data in stream_events(url, payload):
            if data == "[DONE]":
                continue
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(chunk["error"].get("message", "error event"))
            if chunk.get("usage"):
                result.completion_tokens = chunk["usage"]["completion_tokens"]
            if not any(c.get("text") for c in chunk.get("choices", [])):
                continue
            now = time.perf_counter()
            if last is None:
                result.ttft_s = now - start
            else:
                result.itl_s.append(now - last)
            last = now
        result.e2e_s = time.perf_counter() - start
        result.ok = result.completion_tokens > 0
        if not result.ok:
            result.error = "no usage chunk"
    except HTTPStatusError as e:
        result.error, result.http_status = f"HTTPStatusError: {e}", e.status
        result.retry_after = e.headers.get("retry-after")
    except Exception as e:  # a failed request is counted, not fatal
        result.error = f"{type(e).__name__}: {e}"
    return result


# ---- one run at one rate ----------------------------------------------------------------------


def run_event_loop(coro):
    """asyncio.run, on uvloop where it is installed (less of the client's CPU per chunk)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


async def _arrivals(count: int, rate: float, seed: int):
    """Yields request indices at Poisson arrival times (all at once when rate is inf)."""
    rng = random.Random(seed)
    for i in range(count):
        yield i
        if math.isfinite(rate) and i + 1 < count:
            await asyncio.sleep(rng.expovariate(rate))


async def run_rate(base_url: str, model: str, prompts: list, requests: list[BenchRequest],
                   rate: float, max_concurrency: int | None, seed: int) -> dict:
    """Sends every request at `rate`; returns the metrics summary with per-request results."""
    url = base_url.rstrip("/") + "/v1/completions"
    limit = asyncio.Semaphore(max_concurrency or len(requests))
    results = [RequestResult(len(r.prompt_token_ids), r.output_len) for r in requests]

    async def one(i: int) -> None:
        async with limit:
            await send_request(url, _payload(model, prompts[i], requests[i].output_len), results[i])

    start, cpu = time.perf_counter(), time.process_time()
    tasks = [asyncio.create_task(one(i)) async for i in _arrivals(len(requests), rate, seed)]
    await asyncio.gather(*tasks)
    duration, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {**summarize(results, duration, rate, max_concurrency), "client_cpu_s": cpu}


def _stats_ms(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": float("nan"), "median": float("nan"), "p99": float("nan")}
    a = np.asarray(values) * 1e3
    return {"mean": float(a.mean()), "median": float(np.median(a)),
            "p99": float(np.percentile(a, 99))}


def summarize(results: list[RequestResult], duration: float, rate: float,
              max_concurrency: int | None) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.completion_tokens for r in ok)
    return {
        "request_rate": rate if math.isfinite(rate) else "inf",
        "max_concurrency": max_concurrency, "duration_s": duration,
        "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "output_tokens": out_tokens, "asked_output_tokens": sum(r.output_len for r in results),
        "request_throughput": len(ok) / duration, "output_throughput": out_tokens / duration,
        "ttft_ms": _stats_ms([r.ttft_s for r in ok]),
        "tpot_ms": _stats_ms([r.tpot_s for r in ok if r.tpot_s is not None]),
        "itl_ms": _stats_ms([x for r in ok for x in r.itl_s]),
        "e2e_ms": _stats_ms([r.e2e_s for r in ok]),
        "requests": [asdict(r) for r in results],
    }


# ---- prompts, server ----------------------------------------------------------------------------


def build_prompts(model_dir: str, requests: list[BenchRequest], fmt: str) -> list:
    """Token ids as they are, or the text the model's tokenizer decodes them to."""
    if fmt == "ids":
        return [r.prompt_token_ids for r in requests]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return [tok.decode(r.prompt_token_ids, skip_special_tokens=True) for r in requests]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_argv(model_dir: str, port: int, args: argparse.Namespace) -> list[str]:
    argv = [sys.executable, "-m", "pagedserve.cli", "serve", model_dir, "--port", str(port),
            "--grpc-port", "-1", "--log-level", "warning",
            "--max-num-seqs", str(args.max_num_seqs),
            "--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    if args.dtype != "auto":
        argv += ["--dtype", args.dtype]
    if args.kv_cache_memory_bytes:
        argv += ["--kv-cache-memory-bytes", str(args.kv_cache_memory_bytes)]
    return argv + list(getattr(args, "extra_serve_args", ()))


def wait_healthy(base_url: str, proc: subprocess.Popen | None, timeout: float) -> None:
    from pagedserve.health import http_ok

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"pagedserve serve exited with code {proc.returncode}")
        if http_ok(base_url.rstrip("/") + "/health"):
            return
        time.sleep(0.5)
    raise TimeoutError(f"{base_url} was not healthy within {timeout:.0f} s")


@contextmanager
def launched_server(model_dir: str, args: argparse.Namespace):
    """`pagedserve serve` on a free loopback port; yields its base URL; SIGTERM on the way out."""
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(_serve_argv(model_dir, port, args), cwd=ROOT,
                            start_new_session=True)
    try:
        wait_healthy(base_url, proc, args.startup_timeout)
        yield base_url
    finally:
        stop_server(proc, timeout=60)


def stop_server(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM (a clean drain), then SIGKILL to its whole session when it outlives timeout."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# ---- the sweep ----------------------------------------------------------------------------------


def parse_rates(text: str) -> list[float]:
    return [float("inf") if r.strip().lower() == "inf" else float(r) for r in text.split(",")
            if r.strip()]


def _warm_up(base_url: str, model: str, model_dir: str, requests: list[BenchRequest],
             fmt: str) -> None:
    """Two short requests with prompts the workload does not share (nothing cached for it)."""
    from pagedserve.bench.throughput import warm_up_requests

    few = warm_up_requests(requests, 2)
    run_event_loop(run_rate(base_url, model, build_prompts(model_dir, few, fmt), few,
                            float("inf"), None, 0))


def prompt_variant(requests: list[BenchRequest], index: int, vocab_size: int,
                   first_token_id: int = 16) -> list[BenchRequest]:
    """The workload with every prompt id moved by index * 7919 within the ordinary vocabulary:
    the same lengths, but no prompt block in common with another variant, so one run of a sweep
    finds nothing in the prefix cache that an earlier run left there. Variant 0 is the workload."""
    span = vocab_size - first_token_id
    return [BenchRequest([first_token_id + (t - first_token_id + index * 7919) % span
                          for t in r.prompt_token_ids], r.output_len) for r in requests]


def sweep(base_url: str, model_dir: str, requests: list[BenchRequest], vocab_size: int,
          args: argparse.Namespace, first_variant: int = 0) -> list[dict]:
    """One run per rate, each with its own prompt variant (see prompt_variant), numbered from
    first_variant."""
    model = args.served_model_name or model_dir
    _warm_up(base_url, model, model_dir, requests, args.prompt_format)
    runs = []
    for i, rate in enumerate(parse_rates(args.request_rates), start=first_variant):
        variant = prompt_variant(requests, i, vocab_size)
        prompts = build_prompts(model_dir, variant, args.prompt_format)
        run = run_event_loop(run_rate(base_url, model, prompts, variant, rate,
                                      args.max_concurrency, args.seed))
        run["prompt_variant"] = i
        print_run(run)
        runs.append(run)
    return runs


def print_run(run: dict) -> None:
    print(f"\nrate {run['request_rate']} req/s, max concurrency {run['max_concurrency']}: "
          f"{run['completed']} ok, {run['failed']} failed in {run['duration_s']:.1f} s")
    for e in run["errors"]:
        print(f"  error: {e}")
    print(f"  request throughput {run['request_throughput']:.2f} req/s, "
          f"output {run['output_throughput']:.1f} tok/s; this client used "
          f"{run['client_cpu_s']:.1f} s of CPU (it shares the machine with the server)")
    print(f"  {'ms':<6} {'mean':>9} {'median':>9} {'p99':>9}")
    for name in ("ttft", "tpot", "itl", "e2e"):
        s = run[f"{name}_ms"]
        print(f"  {name:<6} {s['mean']:>9.1f} {s['median']:>9.1f} {s['p99']:>9.1f}")


def plot(runs: list[dict], path: Path) -> bool:
    """Latency percentiles and throughput against rate; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    finite = [r["request_rate"] for r in runs if r["request_rate"] != "inf"]
    inf_x = max(finite, default=1.0) * 1.5
    xs = [inf_x if r["request_rate"] == "inf" else r["request_rate"] for r in runs]
    labels = ["inf" if r["request_rate"] == "inf" else f"{r['request_rate']:g}" for r in runs]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    for ax, name, unit in zip(axes, ("ttft", "tpot", "e2e"), (1e3, 1.0, 1e3)):
        for stat, style in (("median", "o-"), ("p99", "s--")):
            ax.plot(xs, [r[f"{name}_ms"][stat] / unit for r in runs], style, label=stat)
        ax.set_title(f"{name.upper()} ({'s' if unit > 1 else 'ms'})")
        ax.legend()
    axes[3].plot(xs, [r["output_throughput"] for r in runs], "o-")
    axes[3].set_title("output throughput (tok/s)")
    for ax in axes:
        ax.set_xticks(xs, labels)
        ax.set_xlabel("request rate (req/s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def compare_offline(model_dir: str, requests: list[BenchRequest], runs: list[dict],
                    vocab_size: int, args: argparse.Namespace) -> dict:
    """The saturated run's requests through the offline LLM (same batching options); serving's
    share of its output throughput."""
    from pagedserve.bench.throughput import run_pagedserve

    saturated = max(runs, key=lambda r: r["output_throughput"])
    variant = prompt_variant(requests, saturated["prompt_variant"], vocab_size)
    offline = run_pagedserve(model_dir, variant, args)
    share = saturated["output_throughput"] / offline["output_tokens_per_s"]
    print(f"\noffline LLM: {offline['output_tokens_per_s']:.1f} output tok/s; serving at rate "
          f"{saturated['request_rate']}: {saturated['output_throughput']:.1f} tok/s = "
          f"{share:.1%} of offline")
    return {"offline": offline, "serve_rate": saturated["request_rate"],
            "serve_share_of_offline": share}


def _median_round(rounds: list[tuple[list[dict], dict | None]]) -> tuple[list[dict], dict | None]:
    """The round whose served share of offline is the median (the lower middle one of an even
    count), its comparison carrying every round's share; a single round as it is."""
    if len(rounds) == 1:
        return rounds[0]
    ranked = sorted(rounds, key=lambda r: r[1]["serve_share_of_offline"])
    runs, comparison = ranked[(len(ranked) - 1) // 2]
    shares = [r[1]["serve_share_of_offline"] for r in rounds]
    print(f"\nserved share of offline over {len(rounds)} rounds: "
          + ", ".join(f"{x:.1%}" for x in shares) + f"; median {comparison['serve_share_of_offline']:.1%}")
    return runs, {**comparison, "round_shares": shares}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="a running server")
    p.add_argument("--launch", action="store_true", help="start pagedserve serve MODEL itself")
    p.add_argument("--model", default=None, help="HF-format model dir (default: small llama)")
    p.add_argument("--preset", default="small", help="make-model preset when --model is absent")
    p.add_argument("--served-model-name", default=None, help="model id (default: --model)")
    p.add_argument("--num-requests", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--request-rate", "--request-rates", dest="request_rates", default="inf",
                   help="requests/s, or a comma list to sweep (inf: all at once)")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--prompt-format", choices=("ids", "text"), default="ids")
    p.add_argument("--compare-offline", action="store_true",
                   help="also serve the requests through the offline LLM and compare")
    p.add_argument("--rounds", type=int, default=1,
                   help="with --compare-offline: served runs and offline runs alternate this many "
                        "times; the round with the median share is reported")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--out", default=str(ROOT / "results" / "serve.json"))
    args = p.parse_args(argv)
    args.device = "cpu"  # what --compare-offline's LLM runs on
    return args


def main(argv: list[str] | None = None) -> int:
    from pagedserve.bench.roofline import machine_description, model_config
    from pagedserve.bench.throughput import default_model

    args = parse_args(argv)
    model_dir = args.model or str(default_model(args.preset))
    vocab = model_config(model_dir)["vocab_size"]  # an HF directory or a GGUF file
    requests = sharegpt_like(args.num_requests, vocab, seed=args.seed)
    rounds = []
    for r in range(args.rounds if args.compare_offline else 1):
        # a round's prompts share no block with an earlier round's (a running server's prefix
        # cache keeps them); a launched server is a fresh one each round, gone while LLM runs
        first = r * len(parse_rates(args.request_rates))
        if args.launch:
            with launched_server(model_dir, args) as base_url:
                runs = sweep(base_url, model_dir, requests, vocab, args, first)
        else:
            wait_healthy(args.base_url, None, 10.0)
            runs = sweep(args.base_url, model_dir, requests, vocab, args, first)
        rounds.append((runs, compare_offline(model_dir, requests, runs, vocab, args)
                       if args.compare_offline else None))
    runs, comparison = _median_round(rounds)
    results = {"model": model_dir, "machine": machine_description(),
               "num_requests": len(requests), "launched": args.launch, "runs": runs}
    if comparison is not None:
        results["comparison"] = comparison
    out = Path(args.out)
    write_results(out, results)
    if len(runs) > 1 and plot(runs, out.with_suffix(".png")):
        print(f"wrote {out.with_suffix('.png')}")
    return 0 if all(r["failed"] == 0 for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
