"""A table of bad requests: each gets its status and an error in OpenAI's shape (never FastAPI's
422), and the next good request succeeds."""

from __future__ import annotations

import json

import httpx
import pytest

from pagedserve.router.limits import Limits
from tests.router.conftest import SERVED

pytestmark = pytest.mark.timeout(60)
C, H = "/v1/completions", "/v1/chat/completions"
LIMITS = Limits()
USER = [{"role": "user", "content": "Hi"}]


def cmpl(**fields) -> dict:
    return {"model": SERVED, "prompt": "x", "max_tokens": 2, **fields}


def chat(**fields) -> dict:
    return {"model": SERVED, "messages": USER, "max_tokens": 2, **fields}


def nested(depth: int) -> bytes:
    return b'{"prompt": "x", "a": ' + b"[" * depth + b"]" * depth + b"}"


# (name, path, body: dict sent as JSON or raw bytes, status, param, code)
CASES: list[tuple[str, str, dict | bytes, int, str | None, str | None]] = [
    # -- not a JSON object ----------------------------------------------------------------------
    ("non-JSON", C, b"{not json", 400, None, None),
    ("empty body", C, b"", 400, None, None),
    ("array body", C, b"[1, 2]", 400, None, None),
    ("string body", C, b'"hello"', 400, None, None),
    ("null body", C, b"null", 400, None, None),
    ("number body", C, b"42", 400, None, None),
    ("bad utf-8", C, b'\xff\xfe{"prompt": 1', 400, None, None),
    ("trailing garbage", C, b'{"prompt": "x"} extra', 400, None, None),
    # -- prompt ---------------------------------------------------------------------------------
    ("missing prompt", C, {"model": SERVED}, 400, "prompt", None),
    ("empty prompt", C, cmpl(prompt=""), 400, "prompt", None),
    ("empty prompt list", C, cmpl(prompt=[]), 400, "prompt", None),
    ("empty string in prompts", C, cmpl(prompt=["a", ""]), 400, "prompt", None),
    ("empty id list in prompts", C, cmpl(prompt=[[5], []]), 400, "prompt", None),
    ("prompt is a number", C, cmpl(prompt=5), 400, "prompt", None),
    ("prompt is an object", C, cmpl(prompt={"text": "x"}), 400, "prompt", None),
    ("prompt mixes ids and text", C, cmpl(prompt=[7, "a"]), 400, "prompt", None),
    ("prompt of booleans", C, cmpl(prompt=[True]), 400, "prompt", None),
    ("prompt of floats", C, cmpl(prompt=[7.5]), 400, "prompt", None),
    ("token id out of vocab", C, cmpl(prompt=[7, 99999]), 400, "prompt", None),
    ("negative token id", C, cmpl(prompt=[-1]), 400, "prompt", None),
    ("lone surrogate in the prompt", C, b'{"prompt": "a\\ud800b"}', 400, None, None),
    ("lone surrogate in a key", C, b'{"prompt": "a", "\\udfff": 1}', 400, None, None),
    ("prompt over the context", C, cmpl(prompt="word " * 300, max_tokens=None), 400, "prompt",
     "context_length_exceeded"),
    ("too many prompts", C, cmpl(prompt=["a"] * (LIMITS.max_prompts + 1)), 400, "prompt", None),
    # -- numbers --------------------------------------------------------------------------------
    ("max_tokens as a string", C, cmpl(max_tokens="5"), 400, "max_tokens", None),
    ("max_tokens zero", C, cmpl(max_tokens=0), 400, "max_tokens", None),
    ("max_tokens negative", C, cmpl(max_tokens=-1), 400, "max_tokens", None),
    ("max_tokens a float", C, cmpl(max_tokens=1.5), 400, "max_tokens", None),
    ("max_tokens past int32", C, cmpl(max_tokens=1 << 40), 400, "max_tokens", None),
    ("max_tokens past int64", C, b'{"prompt": "x", "max_tokens": 9223372036854775808}', 400,
     None, None),
    ("max_tokens huge", C, cmpl(max_tokens=10 ** 30), 400, None, None),
    ("max_tokens over the context", C, cmpl(max_tokens=1000), 400, "prompt",
     "context_length_exceeded"),
    ("temperature NaN", C, b'{"prompt": "x", "temperature": NaN}', 400, None, None),
    ("temperature Infinity", C, b'{"prompt": "x", "temperature": Infinity}', 400, None, None),
    ("temperature -Infinity", C, b'{"prompt": "x", "temperature": -Infinity}', 400, None, None),
    ("temperature 1e400", C, b'{"prompt": "x", "temperature": 1e400}', 400, None, None),
    ("temperature negative", C, cmpl(temperature=-1), 400, "temperature", None),
    ("temperature a string", C, cmpl(temperature="hot"), 400, "temperature", None),
    ("top_p zero", C, cmpl(top_p=0), 400, "top_p", None),
    ("top_p over one", C, cmpl(top_p=1.5), 400, "top_p", None),
    ("top_k below -1", C, cmpl(top_k=-2), 400, "top_k", None),
    ("n zero", C, cmpl(n=0), 400, "n", None),
    ("n negative", C, cmpl(n=-1), 400, "n", None),
    ("n over the limit", C, cmpl(n=LIMITS.max_n + 1), 400, "n", None),
    ("best_of under n", C, cmpl(n=2, best_of=1), 400, "best_of", None),
    ("best_of over the limit", C, cmpl(best_of=LIMITS.max_n + 1), 400, "best_of", None),
    ("logprobs over 20", C, cmpl(logprobs=21), 400, "logprobs", None),
    ("logprobs negative", C, cmpl(logprobs=-1), 400, "logprobs", None),
    ("logprobs a boolean", C, cmpl(logprobs=True), 400, "logprobs", None),
    ("seed past uint64", C, cmpl(seed=1 << 64), 400, None, None),
    ("seed a string", C, cmpl(seed="abc"), 400, "seed", None),
    ("presence_penalty over 2", C, cmpl(presence_penalty=3), 400, "presence_penalty", None),
    ("frequency_penalty under -2", C, cmpl(frequency_penalty=-3), 400, "frequency_penalty",
     None),
    ("repetition_penalty zero", C, cmpl(repetition_penalty=0), 400, "repetition_penalty", None),
    ("min_tokens over max_tokens", C, cmpl(min_tokens=5), 400, "min_tokens", None),
    # -- stop, logit_bias, flags ----------------------------------------------------------------
    ("too many stop strings", C, cmpl(stop=["s"] * (LIMITS.max_stop + 1)), 400, "stop", None),
    ("stop string too long", C, cmpl(stop="s" * (LIMITS.max_stop_length + 1)), 400, "stop",
     None),
    ("stop a number", C, cmpl(stop=5), 400, "stop", None),
    ("stop of numbers", C, cmpl(stop=[1, 2]), 400, "stop", None),
    ("stop_token_ids out of vocab", C, cmpl(stop_token_ids=[99999]), 400, "stop_token_ids",
     None),
    ("logit_bias key not an id", C, cmpl(logit_bias={"abc": 1}), 400, "logit_bias", None),
    ("logit_bias key a superscript digit", C, cmpl(logit_bias={"\u00b2": 1}), 400, "logit_bias",
     None),
    ("logit_bias key negative", C, cmpl(logit_bias={"-5": 1}), 400, "logit_bias", None),
    ("logit_bias value over 100", C, cmpl(logit_bias={"5": 101}), 400, "logit_bias", None),
    ("logit_bias value a string", C, cmpl(logit_bias={"5": "x"}), 400, "logit_bias", None),
    ("logit_bias out of vocab", C, cmpl(logit_bias={"99999": 1}), 400, "logit_bias", None),
    ("logit_bias too big", C, cmpl(logit_bias={str(i): 1 for i in range(1025)}), 400,
     "logit_bias", None),
    ("stream not a boolean", C, cmpl(stream="yes"), 400, "stream", None),
    ("echo not a boolean", C, cmpl(echo="yes"), 400, "echo", None),
    ("stream_options without stream", C, cmpl(stream_options={"include_usage": True}), 400,
     "stream_options", None),
    ("suffix", C, cmpl(suffix="x"), 400, "suffix", None),
    ("best_of > n streamed", C, cmpl(n=1, best_of=2, stream=True), 400, "best_of", None),
    # -- model ----------------------------------------------------------------------------------
    ("unknown model", C, cmpl(model="gpt-17"), 404, "model", "model_not_found"),
    ("model a number", C, cmpl(model=5), 400, "model", None),
    ("unknown model (chat)", H, chat(model="gpt-17"), 404, "model", "model_not_found"),
    # -- chat -----------------------------------------------------------------------------------
    ("missing messages", H, {"model": SERVED}, 400, "messages", None),
    ("empty messages", H, chat(messages=[]), 400, "messages", None),
    ("messages a string", H, chat(messages="hi"), 400, "messages", None),
    ("message not an object", H, chat(messages=["hi"]), 400, "messages", None),
    ("message without role", H, chat(messages=[{"content": "x"}]), 400, "messages", None),
    ("bad role", H, chat(messages=[{"role": "wizard", "content": "x"}]), 400, "messages", None),
    ("null user content", H, chat(messages=[{"role": "user", "content": None}]), 400,
     "messages", None),
    ("content a number", H, chat(messages=[{"role": "user", "content": 5}]), 400, "messages",
     None),
    ("image content part", H, chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]), 400, "messages", None),
    ("text part without text", H, chat(messages=[{"role": "user", "content": [{"type": "text"}]}]),
     400, "messages", None),
    ("lone surrogate in a message", H,
     b'{"messages": [{"role": "user", "content": "\\udc00"}]}', 400, None, None),
    ("messages over the context", H, chat(messages=[{"role": "user", "content": "word " * 300}],
                                          max_tokens=None), 400, "messages",
     "context_length_exceeded"),
    ("tools malformed", H, chat(tools="x"), 400, "tools", None),
    ("tools with auto and no parser", H, chat(tools=[{"type": "function", "function": {
        "name": "f"}}]), 400, "tool_choice", None),
    ("tools with a malformed function", H, chat(tools=[{"type": "function", "function": {}}]),
     400, "tools", None),
    ("tool_choice required", H, chat(tool_choice="required"), 400, "tool_choice", None),
    ("response_format bad schema", H, chat(response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 3}}}), 400,
     "response_format.json_schema.schema", None),
    ("response_format a string", H, chat(response_format="json"), 400, "response_format", None),
    ("response_format without type", H, chat(response_format={}), 400, "response_format.type",
     None),
    ("response_format unknown type", H, chat(response_format={"type": "xml"}), 400,
     "response_format.type", None),
    ("top_logprobs without logprobs", H, chat(top_logprobs=2), 400, "top_logprobs", None),
    ("top_logprobs over 20", H, chat(logprobs=True, top_logprobs=21), 400, "top_logprobs", None),
    ("logprobs an integer (chat)", H, chat(logprobs=5), 400, "logprobs", None),
    ("max_completion_tokens zero", H, chat(max_completion_tokens=0), 400,
     "max_completion_tokens", None),
    ("chat_template untrusted", H, chat(chat_template="{{ messages }}"), 400, "chat_template",
     None),
    # -- size and shape -------------------------------------------------------------------------
    ("oversized body", C, cmpl(prompt="x" * (LIMITS.max_request_body_bytes + 1)), 413, None,
     "request_too_large"),
    ("nested past the limit", C, nested(LIMITS.max_json_depth), 400, None, None),
    ("nested 100000 deep", C, nested(100_000), 400, None, None),
    ("int past int64 deep inside", C, b'{"prompt": "x", "a": {"b": [1, -9223372036854775809]}}',
     400, None, None),
    ("integer of 5000 digits", C, b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", 400,
     None, None),
    ("tokenize without input", "/tokenize", {"model": SERVED}, 400, None, None),
    ("detokenize out of vocab", "/detokenize", {"tokens": [99999]}, 400, "tokens", None),
]


def post(client: httpx.Client, path: str, body: dict | bytes) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post(path, content=content, headers={"content-type": "application/json"})


@pytest.fixture(scope="module")
def http(router):
    with httpx.Client(base_url=router.base_url, timeout=20) as c:
        yield c


def assert_error(r: httpx.Response, status: int, param: str | None = None,
                 code: str | None = None) -> dict:
    assert r.status_code == status, r.text[:500]
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert r.headers["x-request-id"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


def test_table_is_large() -> None:
    assert len(CASES) >= 50 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("name,path,body,status,param,code", CASES, ids=[c[0] for c in CASES])
def test_bad_input(http: httpx.Client, fake, name: str, path: str, body: dict | bytes,
                   status: int, param: str | None, code: str | None) -> None:
    assert_error(post(http, path, body), status, param, code)
    assert fake.requests == []  # refused before reaching the scheduler
    good = post(http, C, cmpl())
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 2


def test_oversized_chunked_body(http: httpx.Client) -> None:
    """No content-length: the size is counted as the body arrives."""
    chunk = b" " * (1 << 16)
    count = LIMITS.max_request_body_bytes // len(chunk) + 2

    def body():
        yield b'{"prompt": "x", "pad": "'
        for _ in range(count):
            yield chunk
        yield b'"}'

    try:
        r = http.post(C, content=body(), headers={"content-type": "application/json"})
    except httpx.TransportError:  # the server may close before the client has sent it all
        pass
    else:
        assert_error(r, 413, code="request_too_large")
    assert post(http, C, cmpl()).status_code == 200
