"""POST /v1/responses through the official openai client (fake scheduler scripted with a model's
output): text and message-list input, instructions, function tools and calls, text.format JSON
schema, streaming events that build the same output as the whole response, and clear 400s for
what this server does not keep (store, previous_response_id)."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.router.conftest import SERVED

pytestmark = pytest.mark.timeout(60)
TOOL = {"type": "function", "name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"], "additionalProperties": False}}


@pytest.fixture
def hermes(router):
    saved = router.core.tool_call_parser, router.core.reasoning_parser
    router.core.tool_call_parser = "hermes"
    yield router.core
    router.core.tool_call_parser, router.core.reasoning_parser = saved


def _script(fake, tokenizer, text: str) -> None:
    fake.script = tokenizer.encode(text, add_special_tokens=False)


def test_text_input_and_instructions(client: openai.OpenAI, fake, tokenizer, router) -> None:
    _script(fake, tokenizer, "Paris is sunny.")
    r = client.responses.create(model=SERVED, input="Weather?", instructions="Be brief.",
                                max_output_tokens=50)
    assert r.status == "completed" and r.output_text == "Paris is sunny."
    assert r.usage.output_tokens == len(fake.script) + 1
    prompt = tokenizer.decode(list(fake.requests[-1].prompt_token_ids), False)
    assert "Be brief." in prompt and "Weather?" in prompt
    cut = client.responses.create(model=SERVED, input="Weather?", max_output_tokens=2)
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"


def test_function_calls_whole_and_streamed(client: openai.OpenAI, fake, tokenizer,
                                           hermes) -> None:
    _script(fake, tokenizer, 'Let me check.<tool_call>{"name": "get_weather", '
                             '"arguments": {"city": "Paris"}}</tool_call>')
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"type": "function_call", "call_id": "call_0", "name": "get_weather",
                "arguments": '{"city": "Rome"}'},
               {"type": "function_call_output", "call_id": "call_0", "output": "20C"}]
    r = client.responses.create(model=SERVED, input=history, tools=[TOOL], max_output_tokens=80)
    kinds = [item.type for item in r.output]
    assert kinds == ["message", "function_call"], kinds
    call = r.output[1]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    events = list(client.responses.create(model=SERVED, input=history, tools=[TOOL],
                                          max_output_tokens=80, stream=True))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    assert [i.type for i in final.output] == kinds
    assert final.output[0].content[0].text == r.output[0].content[0].text == "Let me check."
    assert final.output[1].arguments == call.arguments
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert deltas == call.arguments


def test_text_format_json_schema(client: openai.OpenAI, fake, tokenizer) -> None:
    _script(fake, tokenizer, '{"ok":true}')
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    r = client.responses.create(model=SERVED, input="ok?", text={"format": {
        "type": "json_schema", "name": "flag", "schema": schema, "strict": True}})
    assert json.loads(r.output_text) == {"ok": True}
    assert fake.requests[-1].sampling.structured.grammar.startswith("start: %json")


@pytest.mark.parametrize("body,param", [
    ({"input": "x", "store": True}, "store"),
    ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "s",
                                        "schema": {"type": "integr"}}}}, "text.format"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": [{"type": "image", "url": "x"}]}, "input"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools"),
    ({"input": "x", "tools": [TOOL], "tool_choice": {"type": "function", "name": "nope"}},
     "tool_choice"),
    # found by fuzzing /v1/responses: a name that is not a string was a 500
    ({"input": "", "tool_choice": {"type": "function", "name": [None, None]}}, "tool_choice"),
])
def test_refusals_name_the_responses_field(router, fake, body: dict, param: str) -> None:
    r = httpx.post(router.base_url + "/v1/responses", json={"model": SERVED, **body}, timeout=20)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()
