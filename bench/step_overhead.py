"""Step overhead: the scheduler's and the RPC's share of a decode step at N running requests.

    python -m pagedserve.bench.step_overhead [--num-running 64] [--window-steps 40] [--model DIR]
    pagedserve bench step-overhead ...

Issue 7's target: scheduler plus RPC time at most 10% of a decode step at 64 running requests.
This launches `pagedserve serve` on the small llama bench model as `bench.serve --launch` does (or
measures a running server with --base-url), sends --num-running streaming completions at once
(token-id prompts of 16-48 tokens, max_tokens 300, ignore_eos, temperature 0), polls /metrics until
all of them run with none waiting, waits until every stream has its first token (prefill done:
from then on each step decodes one token for every request) and a few more steps, then reads the
scheduler's step counters (pagedserve_step_*_seconds_total) before and after a window of steps that
ends before any request could finish. The window is valid when its mean batch (running-request sum
over steps) is exactly --num-running and no preemption happened.

Per step it prints: the wall time (client clock between the two scrapes), the sum of the phases,
schedule(), the Execute RPC minus the executor's own compute (transport and serialization),
apply_result + fan-out, the executor's compute, and the overhead share
(schedule + (rpc - execute) + apply) / (schedule + rpc + apply) against the 10% target. The client
shares the machine with the server (its CPU time is printed), as in bench.serve.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import time
from pathlib import Path

from pagedserve.bench.results import write_results
from pagedserve.bench.serve import (
    RequestResult,
    _payload,
    launched_server,
    send_request,
    wait_healthy,
)

ROOT = Path(__file__).resolve().parent.parent
TARGET_SHARE = 0.10
COUNTERS = ("scheduler_steps_total", "step_schedule_seconds_total", "step_rpc_seconds_total",
            "step_execute_seconds_total", "step_apply_seconds_total",
            "step_running_requests_total", "num_preemptions_total")


# ---- requests and /metrics ----------------------------------------------------------------------


def make_prompts(count: int, vocab_size: int, low: int, high: int, seed: int,
                 first_token_id: int = 16) -> list[list[int]]:
    """Random token-id prompts of low..high tokens: no two share a prefix-cache block."""
    rng = random.Random(seed)
    return [[rng.randrange(first_token_id, vocab_size) for _ in range(rng.randint(low, high))]
            for _ in range(count)]


def payload(model: str, prompt: list[int], max_tokens: int) -> dict:
    """bench.serve's streaming request, with usage on every chunk (to follow each request)."""
    body = _payload(model, prompt, max_tokens)
    body["stream_options"]["continuous_usage_stats"] = True
    return body


async def scrape(client, base_url: str) -> dict[str, float]:
    """The router's unlabelled samples, e.g. {'num_requests_running': 64.0, ...}."""
    text = (await client.get(base_url.rstrip("/") + "/metrics")).text
    return {m[1]: float(m[2]) for m in re.finditer(r"^pagedserve_(\w+) (\S+)$", text, re.M)}


async def poll_until(client, base_url: str, done, what: str, timeout: float,
                     interval: float = 0.2) -> dict[str, float]:
    """Scrapes until done(sample) holds; TimeoutError naming `what` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        sample = await scrape(client, base_url)
        if done(sample):
            return sample
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout:.0f} s; last scrape: running "
                               f"{sample.get('num_requests_running')}, waiting "
                               f"{sample.get('num_requests_waiting')}, steps "
                               f"{sample.get('scheduler_steps_total')}")
        await asyncio.sleep(interval)


# ---- the measurement ----------------------------------------------------------------------------


async def measure(base_url: str, model: str, prompts: list[list[int]],
                  args: argparse.Namespace) -> dict:
    """Starts the requests, finds the all-decoding window, returns the two scrapes around it."""
    import httpx

    n = len(prompts)
    url = base_url.rstrip("/") + "/v1/completions"
    results = [RequestResult(len(p), args.max_tokens) for p in prompts]
    limits = httpx.Limits(max_connections=n + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as client:
        cpu = time.process_time()
        tasks = [asyncio.create_task(send_request(url, payload(model, p, args.max_tokens), r))
                 for p, r in zip(prompts, results)]
        try:
            window = await _window(client, base_url, results, args)
        finally:
            for task in tasks:  # the rest of the generation is not measured: abort it
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        window["client_cpu_s"] = time.process_time() - cpu
    return window


async def _window(client, base_url: str, results: list[RequestResult],
                  args: argparse.Namespace) -> dict:
    n = len(results)
    await poll_until(client, base_url, lambda s: s.get("num_requests_running") == n
                     and s.get("num_requests_waiting") == 0, f"{n} running, none waiting",
                     args.timeout)
    await _until(lambda: all(r.completion_tokens > 0 for r in results),
                 "a first token on every stream", args.timeout)
    steps = (await scrape(client, base_url))["scheduler_steps_total"]
    await poll_until(client, base_url, lambda s: s["scheduler_steps_total"] >= steps
                     + args.skip_steps, "warm-up steps", args.timeout)
    before, start = await scrape(client, base_url), time.perf_counter()
    last_safe = args.max_tokens - args.finish_margin
    after = await poll_until(
        client, base_url, lambda s: s["scheduler_steps_total"] >= before["scheduler_steps_total"]
        + args.window_steps or max(r.completion_tokens for r in results) >= last_safe,
        f"{args.window_steps} steps", args.timeout, interval=0.1)
    elapsed = time.perf_counter() - start
    if any(r.error or r.e2e_s for r in results):
        raise RuntimeError("a request ended inside the window: "
                           f"{sorted({r.error for r in results if r.error})[:3]}")
    return {"before": {k: before[k] for k in COUNTERS}, "after": {k: after[k] for k in COUNTERS},
            "elapsed_s": elapsed,
            "max_completion_tokens_seen": max(r.completion_tokens for r in results)}


async def _until(done, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout:.0f} s")
        await asyncio.sleep(0.02)


# ---- the report ---------------------------------------------------------------------------------


def per_step(window: dict, num_running: int) -> dict:
    """Milliseconds per step of each phase, the overhead share, and whether the window is clean."""
    d = {k: window["after"][k] - window["before"][k] for k in COUNTERS}
    steps = d["scheduler_steps_total"]
    if steps <= 0:
        raise RuntimeError("no step ran inside the window")
    ms = {phase: d[f"step_{phase}_seconds_total"] / steps * 1e3
          for phase in ("schedule", "rpc", "execute", "apply")}
    transport = ms["rpc"] - ms["execute"]
    phases = ms["schedule"] + ms["rpc"] + ms["apply"]
    overhead = ms["schedule"] + transport + ms["apply"]
    mean_batch = d["step_running_requests_total"] / steps
    return {
        "steps": int(steps), "mean_batch": mean_batch, "preemptions": int(d["num_preemptions_total"]),
        "clean": mean_batch == num_running and d["num_preemptions_total"] == 0,
        "wall_ms": window["elapsed_s"] / steps * 1e3, "phases_ms": phases,
        "schedule_ms": ms["schedule"], "rpc_ms": ms["rpc"], "transport_ms": transport,
        "apply_ms": ms["apply"], "execute_ms": ms["execute"], "overhead_ms": overhead,
        "overhead_share": overhead / phases, "target_share": TARGET_SHARE,
        "meets_target": overhead / phases <= TARGET_SHARE,
    }


def print_table(r: dict, num_running: int) -> None:
    print(f"\nstep overhead at {num_running} running requests: {r['steps']} steps, mean batch "
          f"{r['mean_batch']:.2f}, {r['preemptions']} preemptions"
          + ("" if r["clean"] else "  (NOT a clean all-decoding window)"))
    rows = [("wall time per step (client clock)", r["wall_ms"]),
            ("sum of phases (schedule + rpc + apply)", r["phases_ms"]),
            ("  schedule()", r["schedule_ms"]),
            ("  rpc - executor compute (transport, serialization)", r["transport_ms"]),
            ("  apply_result + fan-out", r["apply_ms"]),
            ("  executor compute", r["execute_ms"]),
            ("overhead (schedule + transport + apply)", r["overhead_ms"])]
    for name, value in rows:
        print(f"  {name:<54} {value:>9.3f} ms")
    verdict = "meets" if r["meets_target"] else "MISSES"
    print(f"  {'overhead share of the step':<54} {r['overhead_share']:>9.2%}   "
          f"({verdict} the {r['target_share']:.0%} target)")


# ---- command line -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--num-running", type=int, default=64, help="requests decoding together")
    p.add_argument("--window-steps", type=int, default=40, help="steps measured")
    p.add_argument("--skip-steps", type=int, default=4,
                   help="steps left out after the last first token")
    p.add_argument("--max-tokens", type=int, default=300)
    p.add_argument("--finish-margin", type=int, default=20,
                   help="end the window when a request is this close to max_tokens")
    p.add_argument("--prompt-len", default="16,48", help="min,max prompt tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base-url", default=None, help="a running server (default: --launch one)")
    p.add_argument("--model", default=None, help="HF-format model dir (default: small llama)")
    p.add_argument("--preset", default="small", help="make-model preset when --model is absent")
    p.add_argument("--served-model-name", default=None, help="model id (default: --model)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--timeout", type=float, default=300.0, help="for each phase of the run")
    p.add_argument("--out", default=str(ROOT / "results" / "step_overhead.json"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from pagedserve.bench.roofline import machine_description, model_config
    from pagedserve.bench.throughput import default_model

    args = parse_args(argv)
    model_dir = args.model or str(default_model(args.preset))
    vocab = model_config(model_dir)["vocab_size"]  # an HF directory or a GGUF file
    low, high = (int(x) for x in args.prompt_len.split(","))
    prompts = make_prompts(args.num_running, vocab, low, high, args.seed)
    model = args.served_model_name or model_dir
    if args.base_url is None:
        with launched_server(model_dir, args) as base_url:
            window = asyncio.run(measure(base_url, model, prompts, args))
    else:
        wait_healthy(args.base_url, None, 10.0)
        window = asyncio.run(measure(args.base_url, model, prompts, args))
    report = per_step(window, args.num_running)
    print_table(report, args.num_running)
    results = {"model": model_dir, "machine": machine_description(), "launched": not args.base_url,
               "num_running": args.num_running, "max_tokens": args.max_tokens,
               "prompt_len": [low, high], "window": window, "per_step": report}
    out = Path(args.out)
    write_results(out, results)
    return 0 if report["clean"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
