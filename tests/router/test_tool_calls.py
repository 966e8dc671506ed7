"""Tool calling through the router (fake scheduler scripted with a model's output): tool_choice
auto parsed by --tool-call-parser, streamed deltas equal to the whole response, required and a
named function sent to the scheduler as grammars, reasoning_content split off, bad tool fields a
400 naming the field, and tool messages round-tripping through a chat template."""

from __future__ import annotations

import json

import httpx
import pytest

from pagedserve.router.tokenizer import Tokenizer
from pagedserve.router.tools import template_message
from tests.router.conftest import SERVED

pytestmark = pytest.mark.timeout(60)
H = "/v1/chat/completions"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time"}}
USER = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture
def parsers(router):
    core = router.core
    saved = core.tool_call_parser, core.reasoning_parser
    yield core
    core.tool_call_parser, core.reasoning_parser = saved


def _post(router, **body) -> httpx.Response:
    return httpx.post(router.base_url + H, timeout=20,
                      json={"model": SERVED, "messages": USER, "max_tokens": 200, **body})


def _stream(router, **body) -> tuple[dict, str | None]:
    """The streamed deltas folded into one message, and the last finish_reason."""
    msg: dict = {"content": "", "reasoning_content": "", "tool_calls": []}
    finish = None
    with httpx.stream("POST", router.base_url + H, timeout=20, json={
            "model": SERVED, "messages": USER, "max_tokens": 200, "stream": True, **body}) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:])["choices"]:
                d = choice["delta"]
                msg["content"] += d.get("content") or ""
                msg["reasoning_content"] += d.get("reasoning_content") or ""
                for tc in d.get("tool_calls", ()):
                    if tc["index"] == len(msg["tool_calls"]):
                        msg["tool_calls"].append({"id": tc["id"], "type": "function", "function": {
                            "name": tc["function"]["name"], "arguments": ""}})
                    msg["tool_calls"][tc["index"]]["function"]["arguments"] += \
                        tc["function"].get("arguments", "")
                finish = choice["finish_reason"] or finish
    return msg, finish


def _script(fake, tokenizer: Tokenizer, text: str) -> None:
    fake.script = tokenizer.encode(text, add_special_tokens=False)


def test_auto_with_hermes_whole_and_streamed(router, fake, parsers, tokenizer) -> None:
    parsers.tool_call_parser = "hermes"
    _script(fake, tokenizer, 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": '
                             '{"city": "Paris"}}\n</tool_call>')
    r = _post(router, tools=[WEATHER, CLOCK])
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] == "Checking."
    (call,) = message["tool_calls"]
    assert call["function"]["name"] == "get_weather" and call["id"].startswith("call_")
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert not fake.requests[-1].sampling.HasField("structured")  # auto: unconstrained
    streamed, finish = _stream(router, tools=[WEATHER, CLOCK])
    assert finish == "tool_calls" and streamed["content"] == message["content"]
    assert [c["function"] for c in streamed["tool_calls"]] == \
        [c["function"] for c in message["tool_calls"]]


def test_required_and_named_are_grammars(router, fake, parsers, tokenizer) -> None:
    _script(fake, tokenizer, '[{"name":"get_weather","parameters":{"city":"Lyon"}}]')
    r = _post(router, tools=[WEATHER, CLOCK], tool_choice="required")
    assert r.status_code == 200, r.text
    grammar = fake.requests[-1].sampling.structured.grammar
    assert '"minItems":1' in grammar and '"const":"get_time"' in grammar
    (call,) = r.json()["choices"][0]["message"]["tool_calls"]
    assert json.loads(call["function"]["arguments"]) == {"city": "Lyon"}
    _script(fake, tokenizer, '{"city":"Nice"}')
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = _post(router, tools=[WEATHER, CLOCK], tool_choice=named, parallel_tool_calls=False)
    assert r.status_code == 200, r.text
    assert '"required":["city"]' in fake.requests[-1].sampling.structured.grammar
    (call,) = r.json()["choices"][0]["message"]["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city":"Nice"}'}


def test_reasoning_parser_splits_and_wraps_the_constraint(router, fake, parsers,
                                                          tokenizer) -> None:
    parsers.reasoning_parser = "deepseek_r1"
    _script(fake, tokenizer, 'I should answer yes.</think>\n\n{"ok":true}')
    rf = {"type": "json_schema", "json_schema": {"name": "ok", "schema": {
        "type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}}}
    r = _post(router, response_format=rf)
    assert r.status_code == 200, r.text
    message = r.json()["choices"][0]["message"]
    assert message["reasoning_content"] == "I should answer yes."
    assert json.loads(message["content"]) == {"ok": True}
    assert "REASONING" in fake.requests[-1].sampling.structured.grammar
    streamed, _ = _stream(router, response_format=rf)
    assert streamed["reasoning_content"] == message["reasoning_content"]
    assert streamed["content"] == message["content"]


BAD = [
    ("unknown named function", {"tools": [WEATHER], "tool_choice": {
        "type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ("tool_choice not a choice", {"tools": [WEATHER], "tool_choice": "sometimes"},
     "tool_choice"),
    ("required without tools", {"tool_choice": "required"}, "tool_choice"),
    ("named function's name not a string", {"tools": [WEATHER], "tool_choice": {
        "type": "function", "function": {"name": ["get_weather"]}}}, "tool_choice"),
    ("tool without a name", {"tools": [{"type": "function", "function": {}}],
                             "tool_choice": "required"}, "tools"),
    ("tool of another type", {"tools": [{"type": "retrieval"}], "tool_choice": "required"},
     "tools"),
    ("duplicate tool names", {"tools": [WEATHER, WEATHER], "tool_choice": "required"}, "tools"),
    ("parameters not a schema", {"tools": [{"type": "function", "function": {
        "name": "f", "parameters": [1]}}], "tool_choice": "required"}, "tools"),
    ("parameters schema does not compile", {"tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "integr"}}}], "tool_choice": "required"}, "tools"),
    ("JSON mode with tools", {"tools": [WEATHER], "tool_choice": "required",
                              "response_format": {"type": "json_object"}}, "response_format"),
    ("min_tokens with required", {"tools": [WEATHER], "tool_choice": "required",
                                  "min_tokens": 2}, "min_tokens"),
]


def _tool(name: str, strict) -> dict:
    """A tool whose parameters hold a keyword llguidance cannot enforce (dependentRequired)."""
    params = {"type": "object", "properties": {"city": {"type": "string"}},
              "required": ["city"], "dependentRequired": {"city": ["country"]}}
    fn = {"name": name, "parameters": params} | ({} if strict is None else {"strict": strict})
    return {"type": "function", "function": fn}


BAD += [
    ("strict tool with an unenforceable keyword", {"tools": [_tool("f", True)],
                                                   "tool_choice": "required"}, "tools"),
    ("strict left out, named", {"tools": [_tool("f", None)], "tool_choice": {
        "type": "function", "function": {"name": "f"}}}, "tools"),
    ("one strict tool among lenient ones", {"tools": [_tool("f", False), _tool("g", None)],
                                            "tool_choice": "required"}, "tools"),
    ("strict not a boolean", {"tools": [_tool("f", "no")], "tool_choice": "auto"}, "tools"),
]


def test_strict_false_tools_are_enforced_leniently(router, fake, parsers, tokenizer) -> None:
    """strict false: the unenforceable keyword is skipped, the rest of the schema still holds
    (the grammar sent is the lenient one); under auto nothing is constrained either way."""
    parsers.tool_call_parser = "hermes"
    named = {"type": "function", "function": {"name": "f"}}
    for choice in ("required", named):
        r = _post(router, tools=[_tool("f", False), _tool("g", False)], tool_choice=choice)
        assert r.status_code == 200, r.text
        grammar = fake.requests[-1].sampling.structured.grammar
        assert '"lenient":true' in grammar and '"required":["city"]' in grammar
    r = _post(router, tools=[_tool("f", True)], tool_choice="auto")
    assert r.status_code == 200 and not fake.requests[-1].sampling.HasField("structured")


@pytest.mark.parametrize("body,param", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_tool_fields(router, fake, parsers, body: dict, param: str) -> None:
    parsers.tool_call_parser = "hermes"
    r = _post(router, **body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


TEMPLATE = ("{% for m in messages %}[{{ m.role }}|{{ m.content or '' }}"
            "{% for c in m.tool_calls or [] %}|{{ c.function.name }}"
            "{{ c.function.arguments | tojson }}{% endfor %}"
            "{% if m.tool_call_id %}|{{ m.tool_call_id }}{% endif %}]{% endfor %}"
            "{% for t in tools or [] %}<{{ t.function.name }}>{% endfor %}")


def test_tool_messages_round_trip_through_the_template(tokenizer: Tokenizer) -> None:
    tok = Tokenizer(tokenizer.hf, tokenizer.special_tokens, TEMPLATE)
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": None, "tool_calls": [{
                    "id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "content": "18C", "tool_call_id": "call_1"}]
    text = tok.render_chat([template_message(m) for m in messages], False,
                           template_kwargs={"tools": [WEATHER]})
    assert text == ('[user|Weather?][assistant||get_weather{"city": "Paris"}]'
                    "[tool|18C|call_1]<get_weather>")
