"""The HTTP surface as /openapi.json describes it, against the router on the fake scheduler.

The description is exact: Schemathesis draws requests from each operation's description (a
bounded, derandomized run) and hand-picked requests reach every kind of answer (whole and
streamed, logprobs, each error status); every answer must be one the description gives (status,
content type, headers, body), and none a 5xx where the server is well. The limits it states are
the running server's. A method a path does not take gets a 405 with Allow.
"""

from __future__ import annotations

import threading
import time
from dataclasses import fields, replace
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.specs.openapi.schemas import OpenApiSchema

from pagedserve.router.app import create_app
from pagedserve.router.core import RouterCore
from pagedserve.router.limits import Limits
from pagedserve.router.server import RouterThread
from tests.router.conftest import SERVED
from tests.router.fake_scheduler import FakeScheduler, FakeSchedulerThread

pytestmark = pytest.mark.timeout(120)
CONFORMS = [status_code_conformance, content_type_conformance, response_headers_conformance,
            response_schema_conformance]
CHECKS = [not_a_server_error, *CONFORMS]
EXAMPLES = 25  # drawn requests per operation, the same ones every run (derandomized)
USER = [{"role": "user", "content": "Hi!"}]
OPERATIONS = [("/detokenize", "post"), ("/health", "get"), ("/metrics", "get"),
              ("/tokenize", "post"), ("/v1/chat/completions", "post"), ("/v1/completions", "post"),
              ("/v1/models", "get"), ("/v1/responses", "post")]


# -- outside the described operations -------------------------------------------------------------
@pytest.mark.parametrize(("method", "path", "allow"), [
    ("DELETE", "/v1/models", "GET"), ("PUT", "/v1/completions", "POST"),
    ("GET", "/v1/chat/completions", "POST"), ("POST", "/metrics", "GET")])
def test_405_says_which_methods_are_allowed(router, method: str, path: str, allow: str) -> None:
    r = httpx.request(method, router.base_url + path)
    assert r.status_code == 405
    assert r.headers["allow"] == allow  # RFC 9110: a 405 must list the allowed methods
    assert r.json() == {"error": {"message": "Method Not Allowed", "type": "invalid_request_error",
                                  "param": None, "code": None}}
    assert r.headers["x-request-id"]


# -- drawn requests --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def api(router) -> OpenApiSchema:
    return schemathesis.openapi.from_url(router.base_url + "/openapi.json")


def test_every_operation_is_tested(api: OpenApiSchema) -> None:
    assert sorted((p, m) for p, item in api.raw_schema["paths"].items() for m in item) \
        == OPERATIONS


@pytest.mark.parametrize(("path", "method"), OPERATIONS)
def test_drawn_requests_are_answered_as_described(api: OpenApiSchema, fake: FakeScheduler,
                                                  path: str, method: str) -> None:
    operation = api[path][method.upper()]

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy())
    def run(case: schemathesis.Case) -> None:
        statuses.add(case.call_and_validate(checks=CHECKS, session=session).status_code)

    statuses: set[int] = set()
    with requests.Session() as session:
        run()
    if path == "/v1/responses":  # the drawn bodies reach generations, not only refusals
        assert 200 in statuses, statuses


# -- hand-picked requests: every kind of answer ------------------------------------------------
def call(api: OpenApiSchema, path: str, body: Any = None, checks: list = CHECKS,
         method: str = "POST", **kwargs: Any) -> requests.Response:
    """One request to `path`, its answer validated against the description."""
    operation = api[path][method]
    case = operation.Case(body=body, media_type="application/json") if body is not None \
        else operation.Case()
    return case.call_and_validate(checks=checks, **kwargs)


ANSWERS = [  # (path, body, status)
    ("/v1/completions", {"model": SERVED, "prompt": "Hello", "max_tokens": 4}, 200),
    ("/v1/completions", {"prompt": ["a", "b"], "n": 2, "max_tokens": 3, "logprobs": 2,
                         "echo": True}, 200),
    ("/v1/completions", {"prompt": [[7, 8, 9]], "best_of": 3, "n": 2, "max_tokens": 3}, 200),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 4, "stream": True, "logprobs": 1,
                         "echo": True, "stream_options": {"include_usage": True,
                                                          "continuous_usage_stats": True}}, 200),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 4, "logprobs": True,
                              "top_logprobs": 2, "n": 2}, 200),
    ("/v1/chat/completions", {"messages": [*USER, {"role": "assistant", "content": "Hel"}],
                              "max_tokens": 3, "echo": True, "add_generation_prompt": False,
                              "continue_final_message": True}, 200),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 4, "stream": True, "n": 2,
                              "logprobs": True, "stream_options": {"include_usage": True}}, 200),
    ("/tokenize", {"prompt": "Hello"}, 200),
    ("/tokenize", {"messages": USER, "add_generation_prompt": True}, 200),
    ("/detokenize", {"tokens": [7, 8, 9]}, 200),
    ("/v1/completions", {"prompt": "Hi", "n": 17}, 400),
    ("/v1/chat/completions", {"messages": []}, 400),
    ("/v1/completions", {"model": "another", "prompt": "Hi"}, 404),
    ("/tokenize", {"model": "another", "prompt": "Hi"}, 404),
    ("/v1/completions", {"prompt": "x" * (4 << 20)}, 413),
    ("/v1/responses", {"model": SERVED, "input": "Hi", "max_output_tokens": 4}, 200),
    ("/v1/responses", {"input": [{"role": "user", "content": [{"type": "input_text",
                                                                "text": "Hi"}]}],
                       "instructions": "Be brief.", "max_output_tokens": 4, "stream": True}, 200),
    ("/v1/responses", {"input": "Hi", "store": True}, 400),
    ("/v1/responses", {"model": "another", "input": "Hi"}, 404),
]


@pytest.mark.parametrize(("path", "body", "status"), ANSWERS,
                         ids=[f"{p}-{s}-{i}" for i, (p, _, s) in enumerate(ANSWERS)])
def test_answers_are_as_described(api: OpenApiSchema, fake: FakeScheduler, path: str,
                                  body: dict, status: int) -> None:
    fake.tokens_per_message = 2
    r = call(api, path, body)
    assert r.status_code == status, r.text[:300]
    if body.get("stream"):
        assert r.headers["content-type"][0].startswith("text/event-stream")
        if path == "/v1/responses":  # no [DONE]: the last event says the response is done
            assert r.text.rstrip().rpartition("\n\n")[2].startswith("event: response.")
        else:
            assert r.text.endswith("data: [DONE]\n\n")


def test_info_routes_are_as_described(api: OpenApiSchema, fake: FakeScheduler) -> None:
    for path in ("/v1/models", "/health", "/metrics"):
        assert call(api, path, method="GET").status_code == 200
    fake.executor_connected = False
    assert call(api, "/health", method="GET", checks=CONFORMS).status_code == 503


def test_error_mid_stream_is_an_event_as_described(api: OpenApiSchema,
                                                   fake: FakeScheduler) -> None:
    fake.fail_after = 2
    r = call(api, "/v1/chat/completions", {"messages": USER, "max_tokens": 9, "stream": True})
    assert '"error"' in r.text and r.text.endswith("data: [DONE]\n\n")


@pytest.fixture
def thinking_tools(router):
    """A server with the hermes tool-call parser and qwen3's reasoning parser."""
    saved = router.core.tool_call_parser, router.core.reasoning_parser
    router.core.tool_call_parser, router.core.reasoning_parser = "hermes", "qwen3"
    yield router.core
    router.core.tool_call_parser, router.core.reasoning_parser = saved


@pytest.mark.parametrize("stream", [False, True])
def test_every_response_item_is_as_described(api: OpenApiSchema, fake: FakeScheduler, tokenizer,
                                             thinking_tools, stream: bool) -> None:
    """Reasoning, message and function-call items, whole and as streaming events."""
    fake.tokens_per_message = 100
    fake.script = tokenizer.encode('<think>Hmm.</think>Let me check.<tool_call>{"name": "f", '
                                   '"arguments": {"x": 1}}</tool_call>', add_special_tokens=False)
    tool = {"type": "function", "name": "f", "parameters": {"type": "object"}}
    r = call(api, "/v1/responses", {"input": "x", "tools": [tool], "max_output_tokens": 200,
                                    "stream": stream})
    assert r.status_code == 200
    kinds = ['"type": "reasoning"', '"type": "message"', '"type": "function_call"']
    assert all(k in r.text for k in kinds) if stream else \
        [i["type"] for i in r.json()["output"]] == ["reasoning", "message", "function_call"]


def test_responses_chat_tool_calls_are_as_described(api: OpenApiSchema, fake: FakeScheduler,
                                                    tokenizer, thinking_tools) -> None:
    """The chat message and deltas with reasoning_content and tool_calls, too (the output in
    one message, so the stream is short enough for Schemathesis to read whole)."""
    fake.tokens_per_message = 100
    fake.script = tokenizer.encode('<think>Hmm.</think><tool_call>{"name": "f", "arguments": '
                                   '{}}</tool_call>', add_special_tokens=False)
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    for stream in (False, True):
        r = call(api, "/v1/chat/completions", {"messages": USER, "tools": [tool],
                                               "max_tokens": 200, "stream": stream})
        assert r.status_code == 200 and "tool_calls" in r.text and "reasoning_content" in r.text


def test_error_mid_response_stream_is_an_event_as_described(api: OpenApiSchema,
                                                            fake: FakeScheduler) -> None:
    fake.fail_after = 2
    r = call(api, "/v1/responses", {"input": "Hi", "max_output_tokens": 9, "stream": True})
    assert "event: error" in r.text


def test_full_queue_is_a_429_as_described(api: OpenApiSchema, router,
                                          fake: FakeScheduler) -> None:
    core, limits = router.core, router.core.limits
    core.limits = replace(limits, max_queued_requests=1)
    fake.token_delay_s = 0.5  # the first request waits that long for its first token
    body = {"prompt": "x", "max_tokens": 1}
    first = threading.Thread(target=httpx.post, args=(router.base_url + "/v1/completions",),
                             kwargs={"json": body, "timeout": 20})
    try:
        first.start()
        deadline = time.monotonic() + 5
        while core.waiting < 1:
            assert time.monotonic() < deadline, "the first request never waited"
            time.sleep(0.005)
        assert call(api, "/v1/completions", body).status_code == 429
    finally:
        first.join(10)
        core.limits = limits


def test_unreachable_scheduler_is_a_503_as_described(llama_dir, tmp_path) -> None:
    with RouterThread(llama_dir, f"unix://{tmp_path}/none.sock", SERVED) as r:
        api = schemathesis.openapi.from_url(r.base_url + "/openapi.json")
        for path, body in (("/v1/completions", {"prompt": "x", "stream": True}),
                           ("/v1/chat/completions", {"messages": USER}),
                           ("/detokenize", {"tokens": [7]})):
            assert call(api, path, body, checks=CONFORMS).status_code == 503
        assert call(api, "/health", method="GET", checks=CONFORMS).status_code == 503
        assert call(api, "/v1/models", method="GET").status_code == 200


def test_api_key_is_described(llama_dir, scheduler_thread) -> None:
    key = {"Authorization": "Bearer k3y"}
    with RouterThread(llama_dir, scheduler_thread.address, SERVED,
                      core_options={"api_key": "k3y"}) as r:
        api = schemathesis.openapi.from_url(r.base_url + "/openapi.json", headers=key)
        doc = api.raw_schema
        assert doc["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
        for path, method in OPERATIONS:
            entry = doc["paths"][path][method]
            assert ("401" in entry["responses"]) == ("security" in entry) == (path != "/health")
        assert call(api, "/v1/models", method="GET").status_code == 401
        assert call(api, "/tokenize", {"prompt": "Hi"}).status_code == 401
        assert call(api, "/tokenize", {"prompt": "Hi"}, headers=key).status_code == 200


# -- the limits it states ------------------------------------------------------------------------
def _description(limits: Limits, llama_dir) -> dict:
    """The description a router with these limits gives (its app, built but not served)."""
    return create_app(RouterCore(llama_dir, "unix:///nowhere", SERVED, limits=limits)).openapi()


def _branch(prop: dict, kind: str) -> dict:
    return next(b for b in prop.get("anyOf", [prop]) if b.get("type") == kind)


def test_the_limits_are_the_servers(llama_dir, tokenizer) -> None:
    """Each limit a schema can state is there, with the configured value (not the default)."""
    limits = Limits(**{f.name: 3 for f in fields(Limits)})  # 3: unlike any default
    doc = _description(limits, llama_dir)
    schemas = doc["components"]["schemas"]
    cmpl, chat = schemas["CompletionRequest"]["properties"], \
        schemas["ChatCompletionRequest"]["properties"]
    for body in (cmpl, chat):
        assert _branch(body["n"], "integer")["maximum"] == 3
        assert _branch(body["max_tokens"], "integer")["maximum"] == 3
        assert _branch(body["stop"], "array")["maxItems"] == 3
        assert _branch(body["stop"], "array")["items"]["maxLength"] == 3
        assert _branch(body["logit_bias"], "object")["maxProperties"] == 3
        ids = _branch(body["stop_token_ids"], "array")
        assert ids["maxItems"] == 3 and ids["items"]["maximum"] == tokenizer.vocab_size - 1
    assert _branch(cmpl["best_of"], "integer")["maximum"] == 3
    assert _branch(cmpl["logprobs"], "integer")["maximum"] == 3
    assert _branch(chat["top_logprobs"], "integer")["maximum"] == 3
    assert _branch(cmpl["prompt"], "string")["maxLength"] == 3
    assert [b.get("maxItems") for b in cmpl["prompt"]["anyOf"]] == [None, 3, None, 3]
    assert chat["messages"]["maxItems"] == 3 and _branch(chat["tools"], "array")["maxItems"] == 3
    content = schemas["ChatMessage"]["properties"]["content"]
    assert _branch(content, "array")["maxItems"] == 3
    assert _branch(content, "string")["maxLength"] == 3
    for f in fields(Limits):  # the ones no keyword states are written out
        assert f"`{f.name}`: 3 (" in doc["info"]["description"], f.name


def test_the_description_follows_the_vocabulary(llama_dir, tokenizer, tmp_path) -> None:
    """Token ids are bounded by the tokenizer's vocabulary, then by the model's (which may be
    larger) once the scheduler has given it."""
    def bound(r: RouterThread) -> int:
        doc = httpx.get(r.base_url + "/openapi.json").json()
        return doc["components"]["schemas"]["DetokenizeRequest"]["properties"]["tokens"][
            "items"]["maximum"]

    fake = FakeSchedulerThread(f"unix://{tmp_path}/s.sock", vocab_size=4096).start()
    try:
        with RouterThread(llama_dir, fake.address, SERVED) as r:
            assert bound(r) == tokenizer.vocab_size - 1
            assert httpx.post(r.base_url + "/detokenize", json={"tokens": [7]}).status_code == 200
            assert bound(r) == 4096 - 1
    finally:
        fake.stop()
