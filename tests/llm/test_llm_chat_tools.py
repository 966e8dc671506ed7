"""LLM.chat with tools on the random-weight tiny llama (which never "wants" to call a tool: every
call comes from the grammar). tool_choice required and a named function give calls whose
arguments validate with the jsonschema package against the tool's parameters, on every seed; a
strict: false tool still has the rest of its schema enforced; the template sees the tools and
tool messages; bad tool fields are a ValueError naming the field."""

from __future__ import annotations

import json

import jsonschema
import pytest

from pagedserve import LLM, SamplingParams
from pagedserve.sampling_params import StructuredOutputsParams
from tests.conftest import model_dir

pytestmark = pytest.mark.timeout(300)
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 12},
                                  "unit": {"enum": ["C", "F"]}}}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "additionalProperties": False,
                                       "required": ["zone"],
                                       "properties": {"zone": {"type": "integer", "minimum": -12,
                                                               "maximum": 14}}}}}
TOOLS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, CLOCK)}
USER = [{"role": "user", "content": "Weather in Paris?"}]
TEMPLATE = ("{% for m in messages %}[{{ m.role }}|{{ m.content or '' }}"
            "{% for c in m.tool_calls or [] %}|{{ c.function.name }}"
            "{{ c.function.arguments | tojson }}{% endfor %}]{% endfor %}"
            "{% for t in tools or [] %}<{{ t.function.name }}>{% endfor %}")
SEEDS = 12


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(model_dir("llama"), dtype="float32", num_kv_blocks=512, max_num_seqs=32)


def _params(max_tokens: int = 160) -> list[SamplingParams]:
    return [SamplingParams(temperature=1.0, seed=s, max_tokens=max_tokens) for s in range(SEEDS)]


def _calls_of(outputs) -> list[list[dict]]:
    """The tool calls of every completion that stopped on EOS (the others hit max_tokens)."""
    found = []
    for out in outputs:
        c = out.outputs[0]
        if c.finish_reason == "stop":
            assert c.tool_calls and c.content is None, (c.text, c.tool_calls)
            found.append(c.tool_calls)
        else:
            assert c.finish_reason == "length"
    assert found, "no completion stopped; raise max_tokens"
    return found


@pytest.mark.parametrize("parallel", [True, False])
def test_required_calls_validate(llm: LLM, parallel: bool) -> None:
    outputs = llm.chat([USER] * SEEDS, _params(), tools=[WEATHER, CLOCK],
                       tool_choice="required", parallel_tool_calls=parallel)
    for calls in _calls_of(outputs):
        assert parallel or len(calls) == 1
        for call in calls:
            assert call["type"] == "function" and call["id"].startswith("call_")
            name, arguments = call["function"]["name"], call["function"]["arguments"]
            jsonschema.validate(json.loads(arguments), TOOLS[name])


def test_named_function_calls_validate(llm: LLM) -> None:
    choice = {"type": "function", "function": {"name": "get_time"}}
    outputs = llm.chat([USER] * SEEDS, _params(), tools=[WEATHER, CLOCK], tool_choice=choice)
    for calls in _calls_of(outputs):
        assert [c["function"]["name"] for c in calls] == ["get_time"]
        jsonschema.validate(json.loads(calls[0]["function"]["arguments"]), TOOLS["get_time"])


def test_strict_false_still_enforces_the_rest(llm: LLM) -> None:
    """dependentRequired cannot be enforced: strict (or left out) refuses the tool, strict false
    skips that keyword and still enforces the others."""
    params = dict(TOOLS["get_weather"], dependentRequired={"city": ["unit"]})
    tool = {"type": "function", "function": {"name": "f", "parameters": params}}
    choice = {"type": "function", "function": {"name": "f"}}
    with pytest.raises(ValueError, match=r"^tools: .*dependentRequired"):
        llm.chat(USER, _params()[0], tools=[tool], tool_choice=choice)
    lenient = {"type": "function", "function": {**tool["function"], "strict": False}}
    outputs = llm.chat([USER] * SEEDS, _params(), tools=[lenient], tool_choice=choice)
    for calls in _calls_of(outputs):
        jsonschema.validate(json.loads(calls[0]["function"]["arguments"]), TOOLS["get_weather"])


def test_the_template_sees_tools_and_tool_messages(llm: LLM) -> None:
    history = [*USER, {"role": "assistant", "content": None, "tool_calls": [{
        "id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "20C"}]
    out = llm.chat(history, SamplingParams(max_tokens=2), chat_template=TEMPLATE,
                   tools=[WEATHER, CLOCK])[0]
    assert out.prompt.endswith('|get_weather{"city": "Paris"}][tool|20C]<get_weather><get_time>')
    assert out.outputs[0].tool_calls is None  # no tool_choice, no parser: text as written


def test_auto_reads_the_text_with_the_parser(llm: LLM) -> None:
    """The random model writes no <tool_call>: the whole text is content, and no call."""
    outputs = llm.chat([USER] * 4, _params(24)[:4], tools=[WEATHER], tool_choice="auto",
                       tool_call_parser="hermes")
    for out in outputs:
        c = out.outputs[0]
        assert c.tool_calls == [] and c.content == c.text


@pytest.mark.parametrize("kwargs,field", [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "auto"}, "tool_choice"),  # auto needs a parser
    ({"tools": [WEATHER], "tool_call_parser": "nope"}, "tool_call_parser"),
    ({"tools": [{"type": "function", "function": {}}]}, "tools"),
    ({"tools": [WEATHER], "tool_choice": "required",
      "sampling_params": SamplingParams(structured_outputs=StructuredOutputsParams(
          json_object=True))}, "structured_outputs.json_object"),
    ({"tools": [WEATHER], "tool_choice": "required",
      "sampling_params": SamplingParams(min_tokens=1)}, "min_tokens"),
])
def test_bad_tool_fields_name_the_field(llm: LLM, kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}: "):
        llm.chat(USER, **kwargs)
