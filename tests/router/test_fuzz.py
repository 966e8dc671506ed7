"""A hypothesis fuzz over the router's own OpenAPI schema: bodies drawn from each endpoint's
request schema, some with one field replaced by arbitrary JSON, must never get a 5xx; every
refusal is an error in OpenAI's shape, every stream ends with [DONE] and no internal error.

Bounded: about 200 examples in all, derandomized (the same examples every run, so CI does not
flake), well under 30 s against the fake scheduler.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.router.conftest import SERVED

pytestmark = pytest.mark.timeout(120)
REFUSED = {"chat_template", "chat_template_kwargs", "tools", "tool_choice", "response_format",
           "suffix", "stream_options",
           # constraints: random ones rarely compile, and those that do may need no token
           "structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar"}
ALWAYS = {"content", "text"}  # in sane bodies: messages and text parts have text
EXAMPLES = {"/v1/completions": 80, "/v1/chat/completions": 80, "/tokenize": 25,
            "/detokenize": 25}

ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12)
    | st.sampled_from(["\ud800", "a\udfffb"]),  # lone surrogates: valid JSON escapes
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                 max_size=3),
    max_leaves=8)


def _number(schema: dict, integer: bool, sane: bool) -> st.SearchStrategy:
    lo = schema.get("minimum", schema.get("exclusiveMinimum"))
    hi = schema.get("maximum", schema.get("exclusiveMaximum"))
    if integer:
        if sane:  # small values, where a real request's numbers are
            start = lo if lo is not None else 0
            return st.integers(start, min(hi, start + 8) if hi is not None else start + 8)
        return st.integers(lo, hi)
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False,
                     exclude_min="exclusiveMinimum" in schema,
                     exclude_max="exclusiveMaximum" in schema)


def _object(schema: dict, defs: dict, sane: bool) -> st.SearchStrategy:
    props = schema.get("properties")
    if props is None:  # a free-form object (logit_bias, tools, chat_template_kwargs)
        values = schema.get("additionalProperties")
        keys = st.integers(0, 2000).map(str) if sane else st.text(max_size=6)  # token ids
        return st.dictionaries(keys, from_schema(values, defs, sane)
                               if isinstance(values, dict) else ANY_JSON, max_size=3)
    required = set(schema.get("required", ())) | (ALWAYS & set(props) if sane else set())
    optional = {k: v for k, v in props.items() if k not in required}
    if sane:
        optional = {k: v for k, v in optional.items() if k not in REFUSED}
    return st.fixed_dictionaries(
        {k: from_schema(v, defs, sane) for k, v in props.items() if k in required},
        optional={k: from_schema(v, defs, sane) for k, v in optional.items()})


def from_schema(schema: dict, defs: dict, sane: bool = False) -> st.SearchStrategy:
    """Values a JSON schema (as pydantic writes it) allows; ANY_JSON where it says nothing.
    sane: small numbers, and none of the fields the server refuses whatever their value."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[1]
        return st.deferred(lambda: from_schema(defs[name], defs, sane))
    if "anyOf" in schema:
        return st.one_of([from_schema(s, defs, sane) for s in schema["anyOf"]])
    if "enum" in schema or "const" in schema:
        return st.sampled_from(schema.get("enum", [schema.get("const")]))
    kind = schema.get("type")
    simple = {"string": st.text(max_size=24), "boolean": st.booleans(), "null": st.none()}
    if kind in simple:
        return simple[kind]
    if kind in ("integer", "number"):
        return _number(schema, kind == "integer", sane)
    if kind == "array":
        return st.lists(from_schema(schema.get("items", {}), defs, sane), min_size=int(sane),
                        max_size=3)
    if kind == "object":
        return _object(schema, defs, sane)
    return ANY_JSON


def bodies(schema: dict, defs: dict) -> st.SearchStrategy:
    """Sane bodies for the served model, bodies anywhere in the schema, and sane ones with one
    field made arbitrary JSON."""
    sane = from_schema(schema, defs, sane=True).map(lambda body: {**body, "model": SERVED})
    keys = sorted(schema.get("properties", {}))
    mutated = st.tuples(sane, st.sampled_from(keys), ANY_JSON).map(
        lambda t: {**t[0], t[1]: t[2]})
    return sane | from_schema(schema, defs) | mutated


@pytest.fixture(scope="module")
def openapi(router) -> dict:
    return httpx.get(router.base_url + "/openapi.json", timeout=10).json()


def check(r: httpx.Response, body: Any) -> None:
    assert r.status_code < 500, (body, r.status_code, r.text[:300])
    if r.status_code >= 400:
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, (body, error)
    elif r.headers["content-type"].startswith("text/event-stream"):
        events = [ln[6:] for ln in r.text.splitlines() if ln.startswith("data: ")]
        assert events[-1] == "[DONE]", (body, r.text[-300:])
        assert all("internal_error" not in e for e in events), (body, events)


@pytest.mark.parametrize("path", sorted(EXAMPLES))
def test_no_5xx(router, fake, openapi: dict, path: str) -> None:
    defs = openapi["components"]["schemas"]
    ref = openapi["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    schema = defs[ref["$ref"].rsplit("/", 1)[1]]

    with httpx.Client(base_url=router.base_url, timeout=30) as client:
        @settings(max_examples=EXAMPLES[path], deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(body=bodies(schema, defs))
        def run(body: dict) -> None:
            r = client.post(path, content=json.dumps(body),
                            headers={"content-type": "application/json"})
            check(r, body)

        run()
        good = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
        assert good.status_code == 200

