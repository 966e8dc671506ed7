"""The OpenAI HTTP API, through the real `openai` client, against the fake scheduler."""

from __future__ import annotations

import httpx
import openai
import pytest

from pagedserve.router.tokenizer import Tokenizer
from tests.prometheus_samples import family_types, sample
from tests.router.conftest import SERVED
from tests.router.fake_scheduler import FakeScheduler
from tests.waiting import wait_until

PROMPT = "def fibonacci(n):"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]


def expected_text(tokenizer: Tokenizer, prompt_ids: list[int], seed: int, count: int) -> str:
    return tokenizer.decode(FakeScheduler.tokens_for(prompt_ids, seed, count))


# -- completions -------------------------------------------------------------------------------
def test_completion(client: openai.OpenAI, fake: FakeScheduler, tokenizer: Tokenizer) -> None:
    r = client.completions.create(model=SERVED, prompt=PROMPT, max_tokens=8, seed=3,
                                  temperature=0)
    ids = tokenizer.encode(PROMPT)
    assert r.id.startswith("cmpl-") and r.object == "text_completion" and r.model == SERVED
    assert r.choices[0].text == expected_text(tokenizer, ids, 3, 8)
    assert r.choices[0].finish_reason == "length" and r.choices[0].index == 0
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        len(ids), 8, len(ids) + 8)
    sent = fake.requests[-1]
    assert list(sent.prompt_token_ids) == ids and sent.request_id == r.id
    assert (sent.max_tokens, sent.sampling.temperature, sent.sampling.seed) == (8, 0.0, 3)


def test_completion_stream_equals_whole(client: openai.OpenAI, fake: FakeScheduler) -> None:
    fake.tokens_per_message = 3
    whole = client.completions.create(model=SERVED, prompt=PROMPT, max_tokens=10, seed=1)
    chunks = list(client.completions.create(model=SERVED, prompt=PROMPT, max_tokens=10, seed=1,
                                            stream=True, stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert len({c.id for c in chunks}) == 1


def test_defaults(client: openai.OpenAI, fake: FakeScheduler, tokenizer: Tokenizer) -> None:
    fake.eos_at = 3
    r = client.completions.create(model=SERVED, prompt=PROMPT)
    sent = fake.requests[-1]
    assert sent.max_tokens == fake.max_model_len - len(tokenizer.encode(PROMPT))
    assert (sent.sampling.temperature, sent.sampling.top_p, sent.ignore_eos) == (1.0, 1.0, False)
    assert not sent.sampling.HasField("seed")
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 3


def test_eos_text_hidden_and_ignore_eos(client: openai.OpenAI, fake: FakeScheduler,
                                        tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(PROMPT)
    fake.eos_at = 5
    r = client.completions.create(model=SERVED, prompt=PROMPT, max_tokens=9, seed=2,
                                  extra_body={"skip_special_tokens": False})
    assert r.choices[0].text == expected_text(tokenizer, ids, 2, 4)  # EOS counted, not shown
    assert (r.choices[0].finish_reason, r.usage.completion_tokens) == ("stop", 5)
    r = client.completions.create(model=SERVED, prompt=PROMPT, max_tokens=9, seed=2,
                                  extra_body={"ignore_eos": True, "top_k": 5, "min_p": 0.1,
                                              "repetition_penalty": 1.1, "min_tokens": 2})
    assert (r.choices[0].finish_reason, r.usage.completion_tokens) == ("length", 9)
    s = fake.requests[-1].sampling
    assert fake.requests[-1].ignore_eos and fake.requests[-1].min_tokens == 2
    assert (s.top_k, round(s.min_p, 3), round(s.repetition_penalty, 3)) == (5, 0.1, 1.1)


def test_n_choices(client: openai.OpenAI, fake: FakeScheduler, tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(PROMPT)
    r = client.completions.create(model=SERVED, prompt=PROMPT, max_tokens=6, n=2, seed=5)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [expected_text(tokenizer, ids, s, 6) for s in (5, 6)]
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens == len(ids)
    assert sorted(q.request_id for q in fake.requests) == [f"{r.id}-0", f"{r.id}-1"]
    assert sorted(q.sampling.seed for q in fake.requests) == [5, 6]
    stream = client.completions.create(model=SERVED, prompt=PROMPT, max_tokens=6, n=2, seed=5,
                                       stream=True)
    texts = ["", ""]
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == [c.text for c in r.choices]


def _boundary_stop(tokenizer: Tokenizer, tokens: list[int]) -> tuple[str, int]:
    """A stop string made of the end of one token's text and the start of the next's."""
    for k in range(1, len(tokens) - 1):
        a, b = tokenizer.decode(tokens[k:k + 1]), tokenizer.decode(tokens[k + 1:k + 2])
        if len(a) >= 2 and len(b) >= 2 and (a + b).isascii() and (a + b).isprintable():
            stop = a[-2:] + b[:2]
            full = tokenizer.decode(tokens)
            if full.find(stop) == len(tokenizer.decode(tokens[:k + 1])) - 2:
                return stop, k + 2
    raise AssertionError("no ascii token boundary in the fake's output")


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_across_tokens(client: openai.OpenAI, fake: FakeScheduler,
                                   tokenizer: Tokenizer, stream: bool) -> None:
    tokens = FakeScheduler.tokens_for(tokenizer.encode(PROMPT), 11, 40)
    stop, used = _boundary_stop(tokenizer, tokens)
    full = tokenizer.decode(tokens)
    fake.token_delay_s = 0.05  # 2 s of tokens: only the router's cancel ends the stream early
    kw = dict(model=SERVED, prompt=PROMPT, max_tokens=40, seed=11, stop=["NEVER", stop])
    if stream:
        chunks = list(client.completions.create(**kw, stream=True,
                                                stream_options={"include_usage": True}))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        reason = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        usage = chunks[-1].usage
    else:
        r = client.completions.create(**kw)
        text, reason, usage = r.choices[0].text, r.choices[0].finish_reason, r.usage
    assert text == full[: full.find(stop)] and reason == "stop"
    assert usage.completion_tokens == used
    wait_until(lambda: not fake.live)
    assert fake.requests[-1].request_id in fake.cancelled  # the scheduler request was aborted


# -- chat --------------------------------------------------------------------------------------
def test_chat(client: openai.OpenAI, fake: FakeScheduler, tokenizer: Tokenizer) -> None:
    r = client.chat.completions.create(model=SERVED, messages=MESSAGES, max_completion_tokens=7,
                                       seed=4)
    ids = tokenizer.encode_chat(MESSAGES)
    assert list(fake.requests[-1].prompt_token_ids) == ids
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected_text(tokenizer, ids, 4, 7)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 7)
    chunks = list(client.chat.completions.create(
        model=SERVED, messages=MESSAGES, max_tokens=7, seed=4, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == r.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.total_tokens == len(ids) + 7


def test_chat_text_parts(client: openai.OpenAI, fake: FakeScheduler,
                         tokenizer: Tokenizer) -> None:
    parts = [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]
    client.chat.completions.create(model=SERVED, max_tokens=2,
                                   messages=[{"role": "user", "content": parts}])
    want = tokenizer.encode_chat([{"role": "user", "content": "Hi\nthere"}])
    assert list(fake.requests[-1].prompt_token_ids) == want


# -- errors ------------------------------------------------------------------------------------
def _error(e: openai.APIStatusError) -> dict:
    body = e.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_errors(client: openai.OpenAI, router) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="x", max_tokens=1)
    assert _error(e.value)["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=SERVED, prompt="x", temperature=-1)
    assert _error(e.value)["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=SERVED, prompt="x", max_tokens=1000)
    assert _error(e.value)["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=SERVED, prompt="word " * 300)
    assert _error(e.value)["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=SERVED, messages=MESSAGES, n=0)
    assert _error(e.value)["param"] == "n"
    r = httpx.post(router.base_url + "/v1/completions", json={"model": SERVED})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = httpx.post(router.base_url + "/v1/completions", content=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.get(router.base_url + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    bad = [{"min_tokens": 5, "max_tokens": 2}, {"logit_bias": {"x": 1}},
           {"logit_bias": {"99999": 1}}, {"stream_options": {"include_usage": True}},
           {"logprobs": 21}, {"prompt": [1, 99999]}]
    for extra in bad:
        r = httpx.post(router.base_url + "/v1/completions",
                       json={"model": SERVED, "prompt": "x", **extra})
        assert r.status_code == 400, (extra, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


# -- the rest of the surface -------------------------------------------------------------------
def test_models(client: openai.OpenAI, fake: FakeScheduler) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [SERVED]
    assert models[0].model_extra["max_model_len"] == fake.max_model_len


def test_health(router, fake: FakeScheduler) -> None:
    assert httpx.get(router.base_url + "/health").status_code == 200
    fake.executor_connected = False
    assert httpx.get(router.base_url + "/health").status_code == 503


def test_metrics(client: openai.OpenAI, router, fake: FakeScheduler) -> None:
    client.completions.create(model=SERVED, prompt=PROMPT, max_tokens=3)
    text = httpx.get(router.base_url + "/metrics").text
    assert sample(text, "pagedserve_requests_total", endpoint="completions") >= 1
    assert sample(text, "pagedserve_prompt_tokens_total") >= 1
    assert sample(text, "pagedserve_generation_tokens_total") >= 3
    assert sample(text, "pagedserve_request_success_total", finish_reason="length") >= 1
    assert sample(text, "pagedserve_num_requests_running") is not None
    assert sample(text, "pagedserve_kv_cache_usage_perc") == 0.0625
    assert sample(text, "pagedserve_time_to_first_token_seconds_bucket", le="+Inf") >= 1
    assert family_types(text)["pagedserve_e2e_request_latency_seconds"] == "histogram"


def test_metrics_step_counters(router) -> None:
    """The scheduler's step-phase counters, as the fake's Stats reports them."""
    text = httpx.get(router.base_url + "/metrics").text
    for name, value in (("scheduler_steps", 7), ("step_schedule_seconds", 0.5),
                        ("step_rpc_seconds", 2.25), ("step_execute_seconds", 2),
                        ("step_apply_seconds", 0.125), ("step_running_requests", 21)):
        assert sample(text, f"pagedserve_{name}_total") == value, name
        assert family_types(text)[f"pagedserve_{name}"] == "counter", name


def test_tokenize_detokenize(router, tokenizer: Tokenizer, fake: FakeScheduler) -> None:
    url = router.base_url
    r = httpx.post(url + "/tokenize", json={"model": SERVED, "prompt": PROMPT}).json()
    assert r["tokens"] == tokenizer.encode(PROMPT) and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == fake.max_model_len
    r = httpx.post(url + "/tokenize", json={"messages": MESSAGES}).json()
    assert r["tokens"] == tokenizer.encode_chat(MESSAGES)
    r = httpx.post(url + "/detokenize", json={"model": SERVED, "tokens": r["tokens"]}).json()
    assert r["prompt"] == tokenizer.render_chat(MESSAGES)
    assert httpx.post(url + "/tokenize", json={"model": "x", "prompt": "a"}).status_code == 404
    assert httpx.post(url + "/tokenize", json={}).status_code == 400


def test_request_id_header(router) -> None:
    url = router.base_url + "/v1/completions"
    r = httpx.post(url, json={"model": SERVED, "prompt": "x", "max_tokens": 1})
    assert r.headers["x-request-id"] == r.json()["id"]
    r = httpx.post(url, json={"model": SERVED, "prompt": "x", "max_tokens": 1},
                   headers={"X-Request-Id": "mine-42"})
    assert r.headers["x-request-id"] == "mine-42"
    assert httpx.get(router.base_url + "/health").headers["x-request-id"]


def test_disconnect_aborts_stream(router, fake: FakeScheduler) -> None:
    fake.token_delay_s = 0.1  # 20 s of tokens: only a detected disconnect ends it in time
    body = {"model": SERVED, "prompt": PROMPT, "max_tokens": 200, "stream": True}
    with httpx.stream("POST", router.base_url + "/v1/completions", json=body) as r:
        next(r.iter_lines())
    wait_until(lambda: fake.cancelled, timeout=15.0)
    wait_until(lambda: not fake.live, timeout=15.0)
    assert fake.completed == []


def test_disconnect_aborts_non_streaming(router, fake: FakeScheduler) -> None:
    # Slow enough (20 s of tokens) that only a detected disconnect can end it in time, on a
    # loaded CI machine too.
    fake.token_delay_s = 0.1
    body = {"model": SERVED, "prompt": PROMPT, "max_tokens": 200, "n": 2}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(router.base_url + "/v1/completions", json=body, timeout=0.3)
    wait_until(lambda: len(fake.cancelled) == 2, timeout=15.0)
    assert not fake.live and fake.completed == []


@pytest.mark.parametrize("stream", [False, True])
def test_scheduler_refusal_gets_a_status(client: openai.OpenAI, fake: FakeScheduler,
                                         stream: bool) -> None:
    import grpc

    fake.refuse = grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(openai.BadRequestError) as e:
        r = client.completions.create(model=SERVED, prompt="x", max_tokens=2, stream=stream)
        list(r) if stream else None
    assert "refused by the fake" in _error(e.value)["message"]


def test_without_scheduler(llama_dir, tmp_path) -> None:
    from pagedserve.router.server import RouterThread

    with RouterThread(llama_dir, f"unix://{tmp_path}/none.sock") as r:
        assert httpx.get(r.base_url + "/health").status_code == 503
        body = {"model": str(llama_dir), "prompt": "x", "max_tokens": 2, "stream": True}
        resp = httpx.post(r.base_url + "/v1/completions", json=body)
        assert resp.status_code == 503 and resp.json()["error"]["type"] == "service_unavailable"
        models = httpx.get(r.base_url + "/v1/models").json()["data"]
        assert models[0]["id"] == str(llama_dir) and models[0]["max_model_len"] is None
        assert "pagedserve_scheduler_up 0" in httpx.get(r.base_url + "/metrics").text


def test_a_restarted_scheduler_is_reached_again(llama_dir, tmp_path) -> None:
    """The router's requests share one Session stream: when the scheduler goes away the requests
    on it fail (none hangs) when resuming is off (tests/services/test_scheduler_restart.py has
    it on), and the next request opens a stream to the new scheduler."""
    from pagedserve.router.server import RouterThread
    from tests.router.fake_scheduler import FakeSchedulerThread

    address = f"unix://{tmp_path}/s.sock"
    first = FakeSchedulerThread(address).start()
    first.servicer.token_delay_s = 0.05
    body = {"model": str(llama_dir), "prompt": "x", "max_tokens": 200, "stream": True}
    with RouterThread(llama_dir, address, core_options={"scheduler_resume_timeout_s": 0}) as r, \
            httpx.Client(timeout=30) as http:
        with http.stream("POST", r.base_url + "/v1/completions", json=body) as resp:
            lines = resp.iter_lines()
            assert resp.status_code == 200 and next(lines).startswith("data: {")
            first.stop()
            rest = [line for line in lines if line]  # ends: an error event, then [DONE]
        assert any('"error"' in line for line in rest) and rest[-1] == "data: [DONE]"
        second = FakeSchedulerThread(address).start()
        try:
            short = {**body, "max_tokens": 3, "stream": False}
            wait_until(lambda: http.post(r.base_url + "/v1/completions",
                                         json=short).status_code == 200, timeout=10)
            assert second.servicer.completed
        finally:
            second.stop()
