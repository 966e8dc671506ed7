"""Structured outputs against a real `pagedserve serve` (random-weight tiny model), through the
official openai client: chat.completions.parse with a pydantic model returns parsed objects."""

from __future__ import annotations

import json
from typing import Literal

import openai
import pytest
from pydantic import BaseModel, Field

from tests.e2e.conftest import Serve

pytestmark = pytest.mark.timeout(120)


class Pet(BaseModel):
    name: str = Field(max_length=8)
    kind: Literal["cat", "dog", "fish"]
    age: int = Field(ge=0, le=30)
    tags: list[Literal["calm", "loud"]] = Field(max_length=2)


@pytest.fixture(scope="module")
def client(serve: Serve) -> openai.OpenAI:
    return openai.OpenAI(base_url=serve.base_url + "/v1", api_key="unused", max_retries=0,
                         timeout=60)


def test_parse_returns_pydantic_objects(client: openai.OpenAI) -> None:
    parsed = 0
    for seed in range(6):
        try:
            completion = client.chat.completions.parse(
                model="", messages=[{"role": "user", "content": "Describe a pet."}],
                response_format=Pet, max_tokens=96, seed=seed, temperature=1.0)
        except openai.LengthFinishReasonError:
            continue  # cut by max_tokens: the only other way it may end
        message = completion.choices[0].message
        assert isinstance(message.parsed, Pet), message
        parsed += 1
    assert parsed >= 2


def test_streamed_constraint_concatenates_to_valid_json(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}},
              "required": ["ok"], "additionalProperties": False}
    rf = {"type": "json_schema", "json_schema": {"name": "flag", "schema": schema}}
    stream = client.chat.completions.create(
        model="", messages=[{"role": "user", "content": "ok?"}], response_format=rf,
        max_tokens=32, seed=1, temperature=1.0, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert json.loads(text)["ok"] in (True, False)


def test_tool_choice_required_arguments_validate(client: openai.OpenAI) -> None:
    import jsonschema

    params = {"type": "object", "additionalProperties": False, "required": ["city", "days"],
              "properties": {"city": {"type": "string", "maxLength": 10},
                             "days": {"type": "integer", "minimum": 1, "maximum": 7}}}
    tools = [{"type": "function", "function": {"name": "forecast", "parameters": params}},
             {"type": "function", "function": {"name": "now", "parameters": {
                 "type": "object", "properties": {}, "additionalProperties": False}}}]
    valid = 0
    for seed in range(4):
        completion = client.chat.completions.create(
            model="", messages=[{"role": "user", "content": "Forecast?"}], tools=tools,
            tool_choice="required", max_tokens=128, seed=seed, temperature=1.0,
            parallel_tool_calls=seed % 2 == 0)
        choice = completion.choices[0]
        if choice.finish_reason == "length":
            continue
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
        for call in choice.message.tool_calls:
            args = json.loads(call.function.arguments)
            if call.function.name == "forecast":
                jsonschema.validate(args, params)
            else:
                assert call.function.name == "now" and isinstance(args, dict)
        valid += 1
    assert valid >= 2
