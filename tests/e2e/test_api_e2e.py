"""The API's newer parameters against the real `pagedserve serve`: logprobs (HTTP completions and
chat formats, gRPC) equal to transformers' on the same weights, batched and token-id prompts,
best_of, and an abort storm after which every KV block is free."""

from __future__ import annotations

import asyncio
import json
import random
import time

import grpc
import httpx
import openai
import pytest

from pagedserve.protos import generation_pb2, generation_pb2_grpc
from tests.e2e.conftest import HF, Serve, metrics

pytestmark = pytest.mark.timeout(120)
TOL = 1e-3  # logprob error allowed (float32 on both sides)
N = 12
PROMPTS = ["The quick brown fox", "def main():"]
MESSAGES = [{"role": "user", "content": "Hello there, how are you?"}]
LONG = 1000  # tokens asked by the streams that the storm drops
GREEDY = {"temperature": 0, "max_tokens": N, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def client(serve: Serve) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{serve.base_url}/v1", api_key="x", max_retries=0,
                         timeout=60)


def close(a: float, b: float) -> bool:
    return abs(a - b) < TOL


def assert_top_close(values: list[float], ref_row, k: int) -> None:
    """Our top-k logprobs are transformers' top-k (compared as sorted values: ties may swap)."""
    ref = sorted(ref_row.topk(k).values.tolist(), reverse=True)
    assert all(close(a, b) for a, b in zip(sorted(values, reverse=True), ref)), (values, ref)


def test_completion_logprobs_equal_transformers(client: openai.OpenAI, hf: HF) -> None:
    ids = hf.prompt_ids(PROMPTS[0])
    tokens, ref = hf.greedy_logprobs(ids, N)
    out = client.completions.create(model="", prompt=PROMPTS[0], logprobs=5, **GREEDY)
    lp = out.choices[0].logprobs
    assert lp.tokens == [hf.tokenizer.decode([t]) for t in tokens]
    for t, (token, value, top) in enumerate(zip(tokens, lp.token_logprobs, lp.top_logprobs)):
        assert close(value, float(ref[t][token])), (t, value, float(ref[t][token]))
        ref_top = ref[t].topk(5).values.tolist()
        assert all(any(close(v, r) for r in ref_top) for v in top.values()), (top, ref_top)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_chat_logprobs_equal_transformers(client: openai.OpenAI, hf: HF) -> None:
    tokens, ref = hf.greedy_logprobs(hf.chat_ids(MESSAGES), N)
    out = client.chat.completions.create(model="", messages=MESSAGES, logprobs=True,
                                         top_logprobs=5, **GREEDY)
    content = out.choices[0].logprobs.content
    assert len(content) == N
    for t, (token, entry) in enumerate(zip(tokens, content)):
        assert close(entry.logprob, float(ref[t][token]))
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token or \
            "\ufffd" in entry.token
        assert_top_close([x.logprob for x in entry.top_logprobs], ref[t], 5)


def test_grpc_logprobs_equal_transformers(serve: Serve, hf: HF) -> None:
    ids = hf.prompt_ids(PROMPTS[1])
    tokens, ref = hf.greedy_logprobs(ids, N)
    with grpc.insecure_channel(serve.grpc_address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        responses = list(stub.Generate(generation_pb2.GenerateRequest(
            prompt=PROMPTS[1], max_tokens=N, temperature=0, ignore_eos=True, logprobs=3),
            timeout=60))
    entries = [e for r in responses for e in r.logprobs]
    assert [e.token_id for e in entries] == tokens
    for t, e in enumerate(entries):
        assert close(e.logprob, float(ref[t][e.token_id]))
        assert len(e.top_token_ids) == 3
        for token_id, value in zip(e.top_token_ids, e.top_logprobs):
            assert close(value, float(ref[t][token_id]))  # each of ours is right, by id
        assert_top_close(list(e.top_logprobs), ref[t], 3)


def test_list_and_token_id_prompts(client: openai.OpenAI, hf: HF) -> None:
    refs = [hf.greedy(p, N) for p in PROMPTS]
    out = client.completions.create(model="", prompt=PROMPTS, n=2, **GREEDY)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert [c.text for c in out.choices] == [r.text for r in refs for _ in range(2)]
    assert out.usage.prompt_tokens == sum(len(r.prompt_ids) for r in refs)
    assert out.usage.completion_tokens == 4 * N
    out = client.completions.create(model="", prompt=[r.prompt_ids for r in refs], **GREEDY)
    assert [c.text for c in out.choices] == [r.text for r in refs]


def test_best_of_returns_the_most_likely(client: openai.OpenAI) -> None:
    args = {"model": "", "prompt": PROMPTS[0], "max_tokens": 6, "temperature": 1.0, "seed": 11,
            "logprobs": 0, "extra_body": {"ignore_eos": True}}
    candidates = client.completions.create(n=4, **args).choices  # seeds 11..14, as best_of's
    best = client.completions.create(n=1, best_of=4, **args)
    scores = [sum(c.logprobs.token_logprobs) for c in candidates]
    assert len(best.choices) == 1 and best.choices[0].index == 0
    assert best.choices[0].text == candidates[scores.index(max(scores))].text
    assert sum(best.choices[0].logprobs.token_logprobs) == pytest.approx(max(scores))
    assert best.usage.completion_tokens == 4 * 6


async def _storm_one(client: httpx.AsyncClient, i: int, cancel_after: int | None) -> dict:
    """One stream; one to be dropped asks for far more tokens than it could get before."""
    max_tokens = 16 if cancel_after is None else LONG
    body = {"prompt": PROMPTS[i % 2], "max_tokens": max_tokens, "temperature": 1.0, "seed": i,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    got: dict = {"chunks": 0, "usage": None, "finish": None}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            got["chunks"] += 1
            got["usage"] = chunk.get("usage") or got["usage"]
            for c in chunk["choices"]:
                got["finish"] = c["finish_reason"] or got["finish"]
            if cancel_after is not None and got["chunks"] >= cancel_after:
                return got  # leaving the block closes the stream: the client goes away
    return got


async def _storm(base_url: str, cancel: dict[int, int]) -> list[dict]:
    async with httpx.AsyncClient(base_url=base_url, timeout=60,
                                 limits=httpx.Limits(max_connections=64)) as client:
        return await asyncio.gather(*(_storm_one(client, i, cancel.get(i)) for i in range(64)))


def test_abort_storm_frees_every_block(serve: Serve, client: openai.OpenAI) -> None:
    """64 concurrent streams, half of them dropped at random points: the survivors get all
    their tokens, and afterwards every KV block is free again."""
    rng = random.Random(6)
    cancel = {i: rng.randint(1, 8) for i in rng.sample(range(64), 32)}
    before = metrics(serve.base_url)
    results = asyncio.run(_storm(serve.base_url, cancel))
    survivors = [r for i, r in enumerate(results) if i not in cancel]
    assert len(survivors) == 32
    for r in survivors:
        assert r["finish"] == "length" and r["usage"]["completion_tokens"] == 16, r
    deadline = time.monotonic() + 15
    while True:
        now = metrics(serve.base_url)
        if now["kv_cache_blocks_free"] == now["kv_cache_blocks_total"] \
                and now["num_requests_running"] == now["num_requests_waiting"] == 0:
            break
        assert time.monotonic() < deadline, f"blocks still in use after the storm: {now}"
        time.sleep(0.1)
    assert now["router_requests_in_flight"] == now["router_requests_waiting"] == 0
    # The dropped streams were aborted, not run to the end (which takes a step per token).
    assert now["scheduler_steps_total"] - before["scheduler_steps_total"] < LONG
    out = client.completions.create(model="", prompt=PROMPTS[0], max_tokens=3)
    assert out.usage.completion_tokens == 3
