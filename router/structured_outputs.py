"""Structured outputs: every way a request names a constraint, turned into one grammar text.

OpenAI's `response_format`, vLLM's `structured_outputs` and older `guided_*` fields, the gRPC
`StructuredOutputs`, the offline `SamplingParams` and tool_choice all end here as a `Constraint`:
llguidance grammar text (Lark, with JSON schemas inline as `%json {...}` and regexes as `/.../`;
llguidance's JSON form where grammars nest) plus the request field it came from, which a refusal
names. The text is canonical (compact JSON, fixed layout), so the same constraint is the same
text everywhere and the executor's compile cache keys on it. The text travels to the executor in
SamplingParams.structured.grammar; router/grammar_check.py compiles it once here first, so a bad
or pathological constraint is a 400 before anything is scheduled.

JSON is generated compact (no free whitespace): a model that is unsure, above all a random one,
could otherwise spend its whole budget on spaces and newlines between tokens.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from llguidance.gbnf_to_lark import any_to_lark

from pagedserve.router.errors import invalid_request

JSON_OPTIONS = {"whitespace_flexible": False}
REASONING_END = "</think>"
_END = REASONING_END.replace("/", r"\/")
# Text up to and including the first REASONING_END, then optional whitespace, as one lexeme (so
# the lexer never has to guess where the thinking stops): it ends with REASONING_END and holds
# it only once.
_REASONING_LEXEME = (rf"/(.|\n)*{_END}[ \t\r\n]*/ & ~/(.|\n)*{_END}(.|\n)*{_END}(.|\n)*/")
_OPTIONAL_REASONING_LEXEME = _REASONING_LEXEME.replace("/(.|", "/<think>(.|", 1)


@dataclass(frozen=True)
class Constraint:
    """A grammar the output must match, and the request field that asked for it."""

    grammar: str  # llguidance grammar text, canonical
    param: str  # named in any refusal of it


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def json_schema(schema: Any, param: str, strict: bool = True) -> Constraint:
    """A JSON schema (a dict, or its JSON text). Property order is kept: it is output order.

    strict=False (OpenAI's `strict: false`): the schema is a guide. It still constrains the
    output wherever the engine can enforce it, as vLLM does whatever `strict` says (its tool
    calling docs: the field is ignored), but a keyword or format llguidance cannot enforce is
    skipped (its `lenient` option) instead of refusing the request; a schema nothing satisfies
    is still a 400. strict=True, and `strict` left out: every keyword is enforced, and one that
    cannot be is a 400 naming the field, since dropping a rule the client relies on unasked
    would be worse than saying so."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise invalid_request(f"{param} is not valid JSON: {e}", param) from None
    if schema is True:
        schema = {}
    if not isinstance(schema, dict):
        raise invalid_request(f"{param} must be a JSON schema object", param)
    options = {**JSON_OPTIONS, **(schema.get("x-guidance") or {})}
    if not strict:
        options["lenient"] = True
    return Constraint("start: %json " + _compact({**schema, "x-guidance": options}), param)


def json_object(param: str) -> Constraint:
    return json_schema({"type": "object"}, param)


def regex(pattern: Any, param: str) -> Constraint:
    """The whole output matches pattern (Rust regex syntax, as llguidance reads it)."""
    if not isinstance(pattern, str) or not pattern:
        raise invalid_request(f"{param} must be a non-empty regular expression", param)
    return Constraint(f"start: /{_lark_regex_body(pattern)}/", param)


def _lark_regex_body(pattern: str) -> str:
    """pattern inside Lark's /.../: unescaped slashes escaped, newlines written as \\n."""
    out, escaped = [], False
    for ch in pattern:
        if ch == "/" and not escaped:
            out.append("\\/")
        elif ch == "\n":
            out.append("\\n")
        else:
            out.append(ch)
        escaped = ch == "\\" and not escaped
    return "".join(out)


def choice(options: Any, param: str) -> Constraint:
    """The output is exactly one of the strings."""
    if (not isinstance(options, Sequence) or isinstance(options, str) or not options
            or not all(isinstance(o, str) for o in options)):
        raise invalid_request(f"{param} must be a non-empty list of strings", param)
    return Constraint("start: " + " | ".join(_compact(o) for o in options), param)


def grammar(text: Any, param: str) -> Constraint:
    """A context-free grammar: Lark (llguidance's dialect), or GBNF / EBNF (rules with ::=)."""
    if not isinstance(text, str) or not text.strip():
        raise invalid_request(f"{param} must be a non-empty grammar", param)
    try:
        lark = any_to_lark(text) if "::=" in text else text
    except Exception as e:  # the converter raises whatever its parser meets
        raise invalid_request(f"{param}: the GBNF grammar does not parse: {e}", param) from None
    return Constraint(lark.strip() + "\n", param)


def after_reasoning(c: Constraint, optional: bool = False) -> Constraint:
    """The same constraint on what follows the model's thinking (up to the first </think>).
    optional: the thinking may be absent, and when present starts with <think> (Qwen3); else
    it is always there, its opening already in the prompt (DeepSeek-R1)."""
    lexeme = _OPTIONAL_REASONING_LEXEME if optional else _REASONING_LEXEME
    start = "start: REASONING @answer | @answer" if optional else "start: REASONING @answer"
    outer = f"{start}\nREASONING: {lexeme}\n"
    wrapped = {"grammars": [{"lark_grammar": outer},
                            {"name": "answer", "lark_grammar": c.grammar}]}
    return replace(c, grammar=_compact(wrapped))


# ---- request fields -----------------------------------------------------------------------------

GUIDED_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
_STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object")
_BUILDERS = {"json": json_schema, "regex": regex, "choice": choice, "grammar": grammar}


def from_response_format(fmt: Mapping[str, Any] | None) -> Constraint | None:
    """OpenAI's response_format: text (none), json_object, or json_schema."""
    if fmt is None:
        return None
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_object("response_format")
    if kind != "json_schema":
        raise invalid_request("response_format.type must be 'text', 'json_object' or "
                              "'json_schema'", "response_format.type")
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict):
        raise invalid_request("response_format.json_schema must be an object with a schema",
                              "response_format.json_schema")
    name = spec.get("name")
    if name is not None and not isinstance(name, str):
        raise invalid_request("response_format.json_schema.name must be a string",
                              "response_format.json_schema.name")
    if "schema" not in spec:  # OpenAI allows it; then any JSON object
        return json_object("response_format.json_schema")
    strict = strict_flag(spec.get("strict"), "response_format.json_schema.strict")
    return json_schema(spec["schema"], "response_format.json_schema.schema", strict)


def strict_flag(value: Any, param: str) -> bool:
    """OpenAI's `strict` (response_format.json_schema, a function tool): left out or null means
    true here (see json_schema)."""
    if value is not None and not isinstance(value, bool):
        raise invalid_request(f"{param} must be true or false", param)
    return value is not False


def from_structured_outputs(spec: Any, param: str = "structured_outputs") -> Constraint | None:
    """vLLM's structured_outputs: exactly one of json, regex, choice, grammar, json_object."""
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise invalid_request(f"{param} must be an object", param)
    given = [k for k in _STRUCTURED_KINDS if spec.get(k) not in (None, False)]
    if len(given) != 1:
        raise invalid_request(f"{param} must set exactly one of {', '.join(_STRUCTURED_KINDS)}",
                              param)
    kind = given[0]
    if kind == "json_object":
        return json_object(f"{param}.json_object")
    return _BUILDERS[kind](spec[kind], f"{param}.{kind}")


def from_guided(fields: Mapping[str, Any]) -> Constraint | None:
    """vLLM's older guided_json / guided_regex / guided_choice / guided_grammar (one at most)."""
    given = [f for f in GUIDED_FIELDS if fields.get(f) is not None]
    if not given:
        return None
    if len(given) > 1:
        raise invalid_request(f"give one of {', '.join(GUIDED_FIELDS)}, not several", given[1])
    field = given[0]
    return _BUILDERS[field.removeprefix("guided_")](fields[field], field)


def from_request(fields: Mapping[str, Any]) -> Constraint | None:
    """The one constraint a request's fields ask for; 400 naming the second when several do."""
    found = [(name, c) for name, c in (
        ("response_format", from_response_format(fields.get("response_format"))),
        ("structured_outputs", from_structured_outputs(fields.get("structured_outputs"))),
        ("guided_*", from_guided(fields)),
    ) if c is not None]
    if len(found) > 1:
        raise invalid_request(f"{found[0][0]} and {found[1][0]} both constrain the output; give "
                              "one", found[1][1].param)
    return found[0][1] if found else None
