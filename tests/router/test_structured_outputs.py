"""Structured outputs at the router: every surface sends the same canonical grammar to the
scheduler (HTTP chat and completions, response_format, structured_outputs, guided_*, gRPC), and
every bad constraint is a 400 naming its field, in OpenAI's shape, before anything is scheduled."""

from __future__ import annotations

import grpc
import httpx
import pytest

from pagedserve.protos import generation_pb2, generation_pb2_grpc
from pagedserve.router import structured_outputs as so
from tests.router.conftest import SERVED

pytestmark = pytest.mark.timeout(60)
C, H = "/v1/completions", "/v1/chat/completions"
USER = [{"role": "user", "content": "Hi"}]
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def chat(**fields) -> dict:
    return {"model": SERVED, "messages": USER, "max_tokens": 2, **fields}


def cmpl(**fields) -> dict:
    return {"model": SERVED, "prompt": "x", "max_tokens": 2, **fields}


def _sent_grammar(router, fake, path: str, body: dict) -> str:
    r = httpx.post(router.base_url + path, json=body, timeout=20)
    assert r.status_code == 200, r.text
    sampling = fake.requests[-1].sampling
    assert sampling.HasField("structured")
    return sampling.structured.grammar


def test_every_surface_sends_one_canonical_grammar(router, fake) -> None:
    want = so.json_schema(SCHEMA, "x").grammar
    rf = {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA, "strict": True}}
    for path, body in [(H, chat(response_format=rf)), (C, cmpl(response_format=rf)),
                       (H, chat(structured_outputs={"json": SCHEMA})),
                       (C, cmpl(guided_json=SCHEMA)), (H, chat(guided_json=str(SCHEMA)
                                                               .replace("'", '"')))]:
        assert _sent_grammar(router, fake, path, body) == want, body
    assert _sent_grammar(router, fake, H, chat(guided_choice=["a", "b"])) == 'start: "a" | "b"'
    assert _sent_grammar(router, fake, C, cmpl(structured_outputs={"regex": "a/b"})) \
        == r"start: /a\/b/"
    obj = _sent_grammar(router, fake, H, chat(response_format={"type": "json_object"}))
    assert obj == so.json_object("x").grammar
    r = httpx.post(router.base_url + H, json=chat(response_format={"type": "text"}), timeout=20)
    assert r.status_code == 200 and not fake.requests[-1].sampling.HasField("structured")


def test_grpc_structured_outputs(router, fake) -> None:
    with grpc.insecure_channel(router.grpc_address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        req = generation_pb2.GenerateRequest(
            prompt="x", max_tokens=2,
            structured_outputs=generation_pb2.StructuredOutputs(
                choice=generation_pb2.Choices(choices=["yes", "no"])))
        list(stub.Generate(req, timeout=20))
        assert fake.requests[-1].sampling.structured.grammar == 'start: "yes" | "no"'
        bad = generation_pb2.GenerateRequest(
            prompt="x", max_tokens=2, structured_outputs=generation_pb2.StructuredOutputs(
                regex="a(b"))
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(bad, timeout=20))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "structured_outputs.regex" in e.value.details()
        plain = generation_pb2.GenerateRequest(prompt="x", max_tokens=2)  # an old client
        list(stub.Generate(plain, timeout=20))
        assert not fake.requests[-1].sampling.HasField("structured")


BAD: list[tuple[str, str, dict, str]] = [
    ("schema with a bad type", H, chat(response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integr"}}}),
     "response_format.json_schema.schema"),
    ("unsupported keyword", H, chat(structured_outputs={"json": {"type": "array",
                                                                 "uniqueItems": True}}),
     "structured_outputs.json"),
    ("unsatisfiable bounds", C, cmpl(guided_json={"type": "integer", "minimum": 3,
                                                  "maximum": 1}), "guided_json"),
    ("schema not JSON", H, chat(guided_json="{nope"), "guided_json"),
    ("schema not an object", H, chat(structured_outputs={"json": [1]}),
     "structured_outputs.json"),
    ("regex does not compile", C, cmpl(guided_regex="a(b"), "guided_regex"),
    ("lark syntax error", H, chat(structured_outputs={"grammar": 'start: "a" ('}),
     "structured_outputs.grammar"),
    ("lark unknown rule", C, cmpl(guided_grammar="start: foo"), "guided_grammar"),
    ("gbnf syntax error", H, chat(guided_grammar='root ::= "a'), "guided_grammar"),
    ("empty choice", H, chat(guided_choice=[]), "guided_choice"),
    ("two kinds in structured_outputs", H, chat(structured_outputs={"regex": "a",
                                                                    "choice": ["a"]}),
     "structured_outputs"),
    ("two surfaces", H, chat(response_format={"type": "json_object"}, guided_regex="a"),
     "guided_regex"),
    ("two guided fields", C, cmpl(guided_regex="a", guided_choice=["a"]), "guided_choice"),
    ("unknown response_format type", H, chat(response_format={"type": "xml"}),
     "response_format.type"),
    ("json_schema without object", H, chat(response_format={"type": "json_schema",
                                                            "json_schema": "s"}),
     "response_format.json_schema"),
    ("min_tokens with a constraint", H, chat(guided_regex="a+", min_tokens=1, max_tokens=3),
     "min_tokens"),
    ("ignore_eos with a constraint", C, cmpl(guided_regex="a+", ignore_eos=True), "ignore_eos"),
    ("self-referencing schema", H, chat(guided_json={"$ref": "#/$defs/a",
                                                     "$defs": {"a": {"$ref": "#/$defs/a"}}}),
     "guided_json"),
]


@pytest.mark.parametrize("path,body,param", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_constraints_are_400_naming_the_field(router, fake, path: str, body: dict,
                                                  param: str) -> None:
    r = httpx.post(router.base_url + path, json=body, timeout=20)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    assert not fake.requests, "a refused constraint reached the scheduler"


def test_compile_deadline_is_a_400(router, fake) -> None:
    checker = router.core._grammars
    assert checker is not None  # built by the tests above
    before, checker.timeout_s = checker.timeout_s, 0.0
    try:
        r = httpx.post(router.base_url + H, timeout=20,
                       json=chat(guided_regex="[a-z]{1,40}(x|y){1,7}unique-deadline"))
    finally:
        checker.timeout_s = before
    assert r.status_code == 400 and r.json()["error"]["param"] == "guided_regex", r.text
    assert "did not compile within" in r.json()["error"]["message"]


# -- strict: false ----------------------------------------------------------------------------
# `if`/`then` and an unknown format: valid JSON schema that llguidance cannot enforce
GUIDE = {"type": "object", "properties": {"a": {"type": "integer"},
                                          "when": {"type": "string", "format": "moon-date"}},
         "required": ["a"], "if": {"required": ["when"]}, "then": {"required": ["a"]}}


def _format(strict) -> dict:
    spec = {"name": "s", "schema": GUIDE} | ({} if strict == "omitted" else {"strict": strict})
    return {"type": "json_schema", "json_schema": spec}


@pytest.mark.parametrize("strict", [True, "omitted", None])
def test_strict_or_omitted_refuses_what_cannot_be_enforced(router, fake, strict) -> None:
    r = httpx.post(router.base_url + H, json=chat(response_format=_format(strict)), timeout=20)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "response_format.json_schema.schema", error
    assert "if" in error["message"] or "moon-date" in error["message"], error


def test_strict_false_enforces_the_rest_and_skips_the_unenforceable(router, fake) -> None:
    grammar = _sent_grammar(router, fake, H, chat(response_format=_format(False)))
    assert grammar == so.json_schema(GUIDE, "x", strict=False).grammar
    assert '"lenient":true' in grammar and '"required":["a"]' in grammar
    plain = so.json_schema(SCHEMA, "x", strict=False).grammar  # an enforceable schema too
    assert _sent_grammar(router, fake, H, chat(response_format={
        "type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA,
                                               "strict": False}})) == plain


def test_strict_must_be_a_boolean(router, fake) -> None:
    r = httpx.post(router.base_url + H, json=chat(response_format=_format("yes")), timeout=20)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "response_format.json_schema.strict"
