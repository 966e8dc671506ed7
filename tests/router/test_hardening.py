"""Auth, the queue limit, internal faults, errors after streaming began, request ids in the logs,
and `pagedserve router`'s own lifecycle (a clean exit 0 on SIGTERM)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from dataclasses import replace

import grpc
import httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pagedserve.protos import generation_pb2 as pb
from pagedserve.protos import generation_pb2_grpc
from pagedserve.router.server import RouterThread
from tests.conftest import ROOT
from tests.router.conftest import SERVED
from tests.router.fake_scheduler import FakeScheduler
from tests.waiting import router_ports, wait_until

pytestmark = pytest.mark.timeout(60)
KEY = "s3cret-key"
BODY = {"model": SERVED, "prompt": "x", "max_tokens": 2}


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


# -- API key ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def keyed(llama_dir, scheduler_thread):
    with RouterThread(llama_dir, scheduler_thread.address, SERVED, grpc_port=0,
                      core_options={"api_key": KEY}) as r:
        yield r


def test_http_api_key(keyed: RouterThread, fake: FakeScheduler) -> None:
    url = keyed.base_url
    assert httpx.get(url + "/health").status_code == 200  # open, for probes
    for path in ("/v1/models", "/metrics", "/openapi.json"):
        assert error_of(httpx.get(url + path), 401)["code"] == "invalid_api_key"
    for auth in ("Bearer wrong", f"Bearer {KEY}x", KEY, f"bearer {KEY}", ""):
        r = httpx.post(url + "/v1/completions", json=BODY, headers={"Authorization": auth})
        error_of(r, 401)
        assert r.headers["x-request-id"]
    assert fake.requests == []
    good = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(url + "/v1/models", headers=good).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).completions.create(
            model=SERVED, prompt="x", max_tokens=1)
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=20)
    assert client.completions.create(model=SERVED, prompt="x", max_tokens=2).usage \
        .completion_tokens == 2


def test_grpc_api_key(keyed: RouterThread) -> None:
    with grpc.insecure_channel(keyed.grpc_address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        for metadata in (None, [("authorization", "Bearer nope")]):
            with pytest.raises(grpc.RpcError) as e:
                stub.ListModels(pb.ListModelsRequest(), metadata=metadata, timeout=10)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as e:
                list(stub.Generate(pb.GenerateRequest(prompt="x", max_tokens=1),
                                   metadata=metadata, timeout=10))
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        good = [("authorization", f"Bearer {KEY}")]
        assert stub.ListModels(pb.ListModelsRequest(), metadata=good, timeout=10).models
        out = list(stub.Generate(pb.GenerateRequest(prompt="x", max_tokens=2), metadata=good,
                                 timeout=10))
        assert out[-1].usage.completion_tokens == 2
        health = health_pb2_grpc.HealthStub(channel)
        health.Check(health_pb2.HealthCheckRequest(), timeout=10)  # no key needed


# -- queue limit, internal faults, errors mid-stream ------------------------------------------
def test_queue_limit_answers_429(router: RouterThread, fake: FakeScheduler) -> None:
    core = router.core
    limits = core.limits
    core.limits = replace(limits, max_queued_requests=2)
    fake.token_delay_s = 0.5
    results: list[int] = []
    try:
        threads = [threading.Thread(target=lambda: results.append(httpx.post(
            router.base_url + "/v1/completions", json={**BODY, "max_tokens": 1},
            timeout=20).status_code)) for _ in range(2)]
        for t in threads:
            t.start()
        wait_until(lambda: core.waiting >= 2, 5, "the two requests waiting")
        r = httpx.post(router.base_url + "/v1/completions", json=BODY, timeout=20)
        assert error_of(r, 429)["type"] == "rate_limit_error"
        assert r.headers["retry-after"] == "1"
        for t in threads:
            t.join(10)
        assert results == [200, 200]
    finally:
        core.limits = limits
    fake.token_delay_s = 0
    assert httpx.post(router.base_url + "/v1/completions", json=BODY).status_code == 200
    assert core.waiting == 0


def test_internal_fault_is_a_logged_500(router: RouterThread, fake: FakeScheduler,
                                        monkeypatch) -> None:
    def boom(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(router.core.tokenizer, "encode", boom)
    r = httpx.post(router.base_url + "/v1/completions", json=BODY,
                   headers={"X-Request-Id": "req-500"})
    error = error_of(r, 500)
    assert "req-500" in error["message"] and "a bug" not in error["message"]
    assert r.headers["x-request-id"] == "req-500"


def sse_events(r: httpx.Response) -> list:
    return [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]


def test_error_after_streaming_began_is_an_sse_event(router: RouterThread,
                                                     fake: FakeScheduler) -> None:
    fake.fail_after = 2
    body = {**BODY, "max_tokens": 10, "stream": True}
    with httpx.stream("POST", router.base_url + "/v1/completions", json=body, timeout=20) as r:
        assert r.status_code == 200
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert set(error) == {"message", "type", "param", "code"} and "broke down" in error["message"]
    assert all("choices" in json.loads(e) for e in events[:-2]) and len(events) >= 3
    fake.fail_after = 0  # before the first token: a real status instead
    r = httpx.post(router.base_url + "/v1/completions", json=body, timeout=20)
    assert error_of(r, 500)["type"] == "internal_error"


def test_internal_fault_mid_stream(router: RouterThread, fake: FakeScheduler, monkeypatch) -> None:
    from pagedserve.router import serving

    def boom(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(serving, "chat_logprobs", boom)
    body = {"model": SERVED, "messages": [{"role": "user", "content": "x"}], "max_tokens": 3,
            "logprobs": True, "stream": True}
    with httpx.stream("POST", router.base_url + "/v1/chat/completions", json=body) as r:
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "internal_error"


# -- `pagedserve router` as a process ----------------------------------------------------------
def test_router_process_logs_request_ids_and_exits_0_on_sigterm(
        llama_dir, scheduler_thread, tmp_path) -> None:
    log_path = tmp_path / "router.log"
    argv = [sys.executable, "-m", "pagedserve.cli", "router", "--model", str(llama_dir),
            "--scheduler", scheduler_thread.address, "--port", "0", "--grpc-port", "-1",
            "--served-model-name", SERVED]
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        port, grpc_port = router_ports(proc, log_path, timeout=30)
        assert grpc_port is None
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: httpx.get(url + "/health", timeout=1).status_code == 200, 30,
                   "the router's /health", proc=proc, log=log_path.read_text)
        r = httpx.post(url + "/v1/completions", json=BODY, headers={"X-Request-Id": "trace-77"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "trace-77"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = [json.loads(line) for line in log_path.read_text().splitlines()
             if line.startswith("{")]
    assert any(e.get("request_id") == "trace-77" and e["event"] == "request finished"
               for e in lines), lines
    assert any(e["event"] == "router stopped" for e in lines)
