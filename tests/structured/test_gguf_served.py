"""`pagedserve serve` on the default GGUF model (SmolLM2-135M-Instruct) answers the official openai
client's `chat.completions.parse` with a pydantic model: the output is constrained by the JSON
schema the client derives, and validates against it with the jsonschema package."""

from __future__ import annotations

import json
from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.gguf.test_real_model_serve import server  # noqa: F401 (a fixture, used below)

pytestmark = [pytest.mark.real_model, pytest.mark.timeout(600)]


class Person(BaseModel):
    name: str = Field(max_length=24)
    age: int = Field(ge=0, le=120)
    city: Literal["Paris", "London", "Rome"]


def test_parse_with_a_pydantic_model(server) -> None:  # noqa: F811
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0,
                           timeout=120)
    model = client.models.list().data[0].id
    ask = [{"role": "user", "content": "Describe a person as JSON with name, age and city."}]
    stopped = 0
    for seed in range(3):
        reply = client.chat.completions.parse(model=model, messages=ask, response_format=Person,
                                              temperature=1.0, seed=seed, max_tokens=80)
        choice = reply.choices[0]
        if choice.finish_reason == "length":
            continue
        assert choice.finish_reason == "stop"
        assert isinstance(choice.message.parsed, Person)
        jsonschema.validate(json.loads(choice.message.content), Person.model_json_schema())
        stopped += 1
        print(f"\n{choice.message.content}")
    assert stopped, "every reply hit max_tokens"
