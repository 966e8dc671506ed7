"""Faults under load: `serve` with its supervisor, a steady stream of seeded streamed requests,
and the executor and scheduler SIGKILLed or SIGSTOPped (longer than the step timeout, then
SIGCONTed) at random moments. The workload (greedy, with top-2 logprobs) runs round after round
while the faults go on; every request of every round completes with exactly the tokens and
logprobs of a fault-free round, none lost or repeated, no KV block is left held, and /health says
503 while a service is down. The model runs in bf16 with --batch-invariant: a request recomputed
after a fault (its prompt and outputs in one prompt pass) is computed bit for bit as the decode
steps computed it (executor/batch_invariance.py); without it a near tie can flip.

PAGEDSERVE_CHAOS_FAULTS sets the number of faults (CI: 6; a longer run: 20 or more, which the
supervisor's restart limit of 5 per child per minute spreads over a few minutes).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.conftest import free_port
from tests.services.conftest import Service

FAULTS = int(os.environ.get("PAGEDSERVE_CHAOS_FAULTS", "6"))
REQUESTS, CONCURRENCY, MAX_TOKENS = 24, 6, 48
pytestmark = pytest.mark.timeout(180 + 30 * FAULTS)


def _pids(serve: Service) -> dict[str, int]:
    """Each child's current pid, from the supervisor's "started" log lines."""
    pids = {}
    for line in serve.log_path.read_text(errors="replace").splitlines():
        if '"started"' in line:
            with_pid = json.loads(line[line.index("{"):])
            pids[with_pid["child"]] = with_pid["pid"]
    return pids


Run = tuple[list[str], list[dict[str, float]]]  # a request's tokens, and each one's top 2


def _workload(client: openai.OpenAI) -> list[Run | BaseException]:
    def one(i: int) -> Run | BaseException:
        try:
            stream = client.completions.create(
                model="", prompt=f"Request {i}: " + "tell me more " * (i % 5 + 1),
                max_tokens=MAX_TOKENS, temperature=0, logprobs=2, stream=True,
                extra_body={"ignore_eos": True})
            tokens, tops = [], []
            for chunk in stream:
                if chunk.choices and chunk.choices[0].logprobs:
                    tokens += chunk.choices[0].logprobs.tokens
                    tops += chunk.choices[0].logprobs.top_logprobs
            return tokens, tops
        except BaseException as e:  # reported by the comparison
            return e

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        return list(pool.map(one, range(REQUESTS)))


def _same_run(got: Run | BaseException, want: Run) -> str | None:
    """None when got is the fault-free run want, token for token and logprob for logprob; else
    where it is not."""
    if isinstance(got, BaseException):
        return repr(got)
    if len(got[0]) != len(want[0]):
        return f"{len(got[0])} tokens, not {len(want[0])}"
    at = next((i for i, pair in enumerate(zip(*got, *want)) if pair[:2] != pair[2:]), None)
    if at is None:
        return None
    return f"token {at}: {got[0][at]!r} {got[1][at]} where the fault-free run has " \
           f"{want[0][at]!r} {want[1][at]}"


KINDS = ("kill executor", "kill scheduler", "stop executor")
SUPERVISOR_WINDOW_S = 62.0  # serve's restart window (60 s), and a margin


def _inject(serve: Service, stop: threading.Event, log: list[str], rng: random.Random) -> None:
    kinds = [kind for _ in range(-(-FAULTS // len(KINDS))) for kind in KINDS][:FAULTS]
    rng.shuffle(kinds)  # every kind, in a random order
    kills: dict[str, list[float]] = {"executor": [], "scheduler": []}
    for n, kind in enumerate(kinds):
        if stop.wait(rng.uniform(0.5, 1.5)):
            return
        child = kind.split()[1]
        if kind.startswith("kill"):  # the supervisor gives up past 5 restarts a minute
            recent = [t for t in kills[child] if time.monotonic() - t < SUPERVISOR_WINDOW_S]
            if len(recent) >= 4 and stop.wait(SUPERVISOR_WINDOW_S - (time.monotonic() - recent[0])):
                return
            kills[child].append(time.monotonic())
        pid = _pids(serve)
        target = pid["executor" if "executor" in kind else "scheduler"]
        log.append(f"{n}: {kind} ({target})")
        if kind.startswith("kill"):
            os.kill(target, signal.SIGKILL)
            time.sleep(4.0)  # the supervisor's restart delay, and the restart itself
        else:
            os.kill(target, signal.SIGSTOP)
            time.sleep(4.0)  # past the 2 s step timeout: the executor counts as lost
            os.kill(target, signal.SIGCONT)


def _status(url: str) -> int:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.TransportError:
        return 0


def _health(url: str, stop: threading.Event, seen: list[int]) -> None:
    while not stop.is_set():
        seen.append(_status(url))
        time.sleep(0.1)


def test_no_request_is_lost_or_changed_by_faults(llama_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    serve = Service("serve", ["serve", str(llama_dir), "--port", str(port), "--grpc-port", "-1",
                              "--dtype", "bfloat16", "--batch-invariant",
                              "--num-kv-blocks", "128", "--max-model-len",
                              "256", "--step-timeout", "2", "--scheduler-resume-timeout", "90",
                              "--drain-timeout", "2", "--frontend-nice", "0"], tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while "pagedserve is ready" not in serve.log():
            assert serve.proc.poll() is None and time.monotonic() < deadline, serve.log()
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", timeout=300, max_retries=0)
        fault_free = _workload(client)
        assert all(not isinstance(r, BaseException) for r in fault_free), fault_free
        stop, faults, health = threading.Event(), [], []
        rng = random.Random(int(os.environ.get("PAGEDSERVE_CHAOS_SEED", "7")))
        threads = [threading.Thread(target=_inject, args=(serve, stop, faults, rng)),
                   threading.Thread(target=_health, args=(f"{base}/health", stop, health))]
        for t in threads:
            t.start()
        rounds = 0
        try:
            while threads[0].is_alive() or rounds == 0:  # the load lasts as long as the faults
                with_faults = _workload(client)
                wrong = {i: why for i, (got, want) in enumerate(zip(with_faults, fault_free))
                         if (why := _same_run(got, want))}
                assert not wrong, (rounds, faults, wrong, serve.log()[-2000:])
                rounds += 1
            while _status(f"{base}/health") != 200:  # the last fault recovers
                assert time.monotonic() < deadline + 60 * FAULTS, serve.log()
                time.sleep(0.2)
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert len(faults) == FAULTS, faults
        assert 503 in health, health  # readiness followed the faults
        print(f"\n{rounds} rounds; faults: {faults}")
        metrics = httpx.get(f"{base}/metrics", timeout=10).text
        free = re.search(r"^pagedserve_kv_cache_blocks_free (\S+)$", metrics, re.M)
        total = re.search(r"^pagedserve_kv_cache_blocks_total (\S+)$", metrics, re.M)
        assert free and total and free.group(1) == total.group(1), metrics
        assert serve.stop() == 0, serve.log()
    finally:
        serve.kill()
