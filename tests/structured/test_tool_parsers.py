"""Tool-call and reasoning parsers on recorded model outputs: the whole message is right, and the
stream, cut at every character boundary (and into many pieces), concatenates to exactly it."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from pagedserve.router.chat_output import ChatOutput
from pagedserve.router.tool_parsers import PARSERS, named_call, required_calls
from pagedserve.router.tools import ToolPlan

WEATHER = {"city": "Paris", "unit": "celsius"}
TRICKY = {"q": 'a "quoted" {brace} [x]\\ \u00e9\u4e2d', "n": [1, 2.5, None], "o": {"k": True}}

# (parser, model output, expected content, expected [(name, arguments)])
RECORDED: list[tuple[str, str, str | None, list[tuple[str, Any]]]] = [
    ("hermes", 'I will check.\n<tool_call>\n{"name": "get_weather", "arguments": '
     '{"city": "Paris", "unit": "celsius"}}\n</tool_call>', "I will check.",
     [("get_weather", WEATHER)]),
    ("hermes", '<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n<tool_call>\n'
     '{"name": "search", "arguments": ' + json.dumps(TRICKY) + "}\n</tool_call>", None,
     [("a", {}), ("search", TRICKY)]),
    ("hermes", "Just text, a < sign and <tool but no call.", "Just text, a < sign and <tool "
     "but no call.", []),
    ("hermes", 'Oops <tool_call>{"name": 5}', "Oops ", []),  # a malformed call is dropped
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris", "unit": '
     '"celsius"}}', None, [("get_weather", WEATHER)]),
    ("llama3_json", '<|python_tag|>{"name": "a", "parameters": {"x": 1}}; {"name": "b", '
     '"parameters": ' + json.dumps(TRICKY) + "}", None, [("a", {"x": 1}), ("b", TRICKY)]),
    ("llama3_json", '{"answer": 42}', '{"answer": 42}', []),
    ("llama3_json", "  The answer is 42.", "  The answer is 42.", []),
    ("mistral", 'Sure.[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", '
     '"unit": "celsius"}}, {"name": "b", "arguments": {}}]', "Sure.",
     [("get_weather", WEATHER), ("b", {})]),
    ("mistral", '[TOOL_CALLS]search[ARGS]' + json.dumps(TRICKY), None, [("search", TRICKY)]),
    ("mistral", "No tools needed [TOOL", "No tools needed [TOOL", []),
    ("pythonic", '[get_weather(city="Paris", unit="celsius"), search(q=\'a "b" (c)\', n=[1, 2])]',
     None, [("get_weather", WEATHER), ("search", {"q": 'a "b" (c)', "n": [1, 2]})]),
    ("pythonic", "[1, 2, 3] is a list", "[1, 2, 3] is a list", []),
    ("pythonic", "Plain answer.", "Plain answer.", []),
]


def _merge(deltas: list[dict]) -> dict:
    """A stream's deltas folded into one message."""
    out: dict[str, Any] = {"content": "", "reasoning_content": "", "tool_calls": []}
    for d in deltas:
        out["content"] += d.get("content", "")
        out["reasoning_content"] += d.get("reasoning_content", "")
        for tc in d.get("tool_calls", ()):
            calls = out["tool_calls"]
            if tc["index"] == len(calls):
                assert "id" in tc and tc["function"]["name"], "id and name must come first"
                calls.append({"id": tc["id"], "type": "function",
                              "function": {"name": tc["function"]["name"], "arguments": ""}})
            calls[tc["index"]]["function"]["arguments"] += tc["function"].get("arguments", "")
    return out


def _same(message: dict, streamed: dict) -> None:
    assert (message["content"] or "") == streamed["content"]
    assert (message.get("reasoning_content") or "") == streamed["reasoning_content"]
    assert message.get("tool_calls", []) == streamed["tool_calls"]


def _plan(parse) -> ToolPlan:
    return ToolPlan([], None, parse, None, False)


def _check_cuts(plan: ToolPlan, text: str, reasoning: str | None = None) -> dict:
    """The whole message; asserts every two-piece and some many-piece streams equal it."""
    whole = ChatOutput.for_request(plan, reasoning)
    whole.feed(text, final=True)
    message = whole.message()
    rng = random.Random(len(text))
    cuts = [[k] for k in range(len(text) + 1)]
    cuts += [sorted(rng.sample(range(len(text) + 1), min(6, len(text)))) for _ in range(20)]
    for points in cuts:
        out = ChatOutput.for_request(plan, reasoning)
        pieces = [text[a:b] for a, b in zip([0, *points], [*points, len(text)])]
        deltas = [out.feed(p) for p in pieces[:-1]] + [out.feed(pieces[-1], final=True)]
        streamed = _merge(deltas)
        # the ids are the stream's own; compare them through the stream's final message
        _same(out.message(), streamed)
        for a, b in zip(message.get("tool_calls", []), streamed["tool_calls"]):
            assert a["function"] == b["function"]
        assert (message["content"] or "") == streamed["content"], points
    return message


@pytest.mark.parametrize("parser,text,content,calls", RECORDED,
                         ids=[f"{r[0]}-{i}" for i, r in enumerate(RECORDED)])
def test_recorded_outputs(parser: str, text: str, content: str | None, calls: list) -> None:
    message = _check_cuts(_plan(PARSERS[parser]), text)
    assert message["content"] == content
    got = [(c["function"]["name"], json.loads(c["function"]["arguments"]))
           for c in message.get("tool_calls", [])]
    assert got == calls


def test_required_and_named_outputs() -> None:
    text = '[{"name":"get_weather","parameters":{"city":"Paris","unit":"celsius"}}]'
    message = _check_cuts(_plan(required_calls), text)
    assert message["tool_calls"][0]["function"]["name"] == "get_weather"
    message = _check_cuts(_plan(named_call("get_weather")), json.dumps(WEATHER))
    assert json.loads(message["tool_calls"][0]["function"]["arguments"]) == WEATHER


def test_parallel_tool_calls_false_keeps_the_first() -> None:
    text = RECORDED[1][1]
    message = _check_cuts(ToolPlan([], None, PARSERS["hermes"], 1, False), text)
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["a"]


@pytest.mark.parametrize("parser,text,reasoning,content", [
    ("deepseek_r1", "Let me think.\n</think>\n\nThe answer is 4.", "Let me think.\n",
     "The answer is 4."),
    ("deepseek_r1", "<think>hmm</think>ok", "hmm", "ok"),
    ("deepseek_r1", "still thinking <", "still thinking <", ""),
    ("qwen3", "<think>\nplan</think>\n\nDone.", "\nplan", "Done."),
    ("qwen3", "No thinking here.", "", "No thinking here."),
])
def test_reasoning_split(parser: str, text: str, reasoning: str, content: str) -> None:
    message = _check_cuts(ToolPlan(None, None, None, None, False), text, parser)
    assert (message["reasoning_content"] or "") == reasoning
    assert message["content"] == content


def test_reasoning_then_tool_call() -> None:
    text = ("<think>The user wants weather.</think>\n<tool_call>\n"
            '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
            "\n</tool_call>")
    message = _check_cuts(_plan(PARSERS["hermes"]), text, "qwen3")
    assert message["reasoning_content"] == "The user wants weather."
    assert message["content"] is None
    assert json.loads(message["tool_calls"][0]["function"]["arguments"]) == WEATHER
