"""A suite of JSON schemas of our own, 120 of them, built deterministically from a few families:
flat and nested objects, arrays with bounds, enums and consts, anyOf / oneOf unions, $ref and
$defs (recursive too), string patterns and formats, numbers with bounds. Strings are mostly
bounded, so a random-weight model can finish one within a test's token budget."""

from __future__ import annotations

import random
from typing import Any

Schema = dict[str, Any]
FORMATS = ("date", "email", "uuid", "ipv4", "time", "date-time")
PATTERNS = (r"^[a-z]{2,6}$", r"^[A-Z][0-9]{3}$", r"^(yes|no|maybe)$", r"^\d{3}-\d{4}$",
            r"^[a-f0-9]{4,8}$")


def _leaf(rng: random.Random) -> Schema:
    kind = rng.randrange(9)
    if kind == 0:
        lo = rng.randrange(-50, 50)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.randrange(1, 500)}
    if kind == 1:
        return {"type": "boolean"}
    if kind == 2:
        return {"enum": rng.sample(["red", "green", "blue", 1, 2.5, None, True, "a b"], 3)}
    if kind == 3:
        return {"type": "string", "maxLength": rng.randrange(1, 12)}
    if kind == 4:
        return {"type": "string", "pattern": rng.choice(PATTERNS)}
    if kind == 5:
        return {"type": "string", "format": rng.choice(FORMATS)}
    if kind == 6:
        return {"type": "number", "minimum": 0, "exclusiveMaximum": rng.randrange(1, 100)}
    if kind == 7:
        return {"const": rng.choice(["fixed", 7, False])}
    return {"type": "null"}


def _object(rng: random.Random, depth: int) -> Schema:
    names = rng.sample(["id", "name", "kind", "size", "tags", "meta", "ok", "score", "x", "y"],
                       rng.randrange(1, 5))
    props = {n: _value(rng, depth - 1) for n in names}
    required = [n for n in names if rng.random() < 0.7]
    return {"type": "object", "properties": props, "required": required,
            "additionalProperties": False}


def _array(rng: random.Random, depth: int) -> Schema:
    lo = rng.randrange(0, 3)
    return {"type": "array", "items": _value(rng, depth - 1), "minItems": lo,
            "maxItems": lo + rng.randrange(0, 3)}


def _value(rng: random.Random, depth: int) -> Schema:
    if depth <= 0:
        return _leaf(rng)
    kind = rng.randrange(5)
    if kind == 0:
        return _object(rng, depth)
    if kind == 1:
        return _array(rng, depth)
    if kind == 2:
        return {"anyOf": [_leaf(rng), _leaf(rng)]}
    return _leaf(rng)


def _with_refs(rng: random.Random) -> Schema:
    point = {"type": "object", "properties": {"x": _leaf(rng), "y": _leaf(rng)},
             "required": ["x", "y"], "additionalProperties": False}
    return {"$defs": {"point": point}, "type": "object", "additionalProperties": False,
            "properties": {"a": {"$ref": "#/$defs/point"},
                           "more": {"type": "array", "items": {"$ref": "#/$defs/point"},
                                    "maxItems": 2}},
            "required": ["a"]}


def _recursive(rng: random.Random) -> Schema:
    return {"$defs": {"node": {"type": "object", "additionalProperties": False,
                               "properties": {"v": _leaf(rng),
                                              "next": {"anyOf": [{"$ref": "#/$defs/node"},
                                                                 {"type": "null"}]}},
                               "required": ["v", "next"]}},
            "$ref": "#/$defs/node"}


def _one_of(rng: random.Random) -> Schema:
    return {"oneOf": [{"type": "object", "properties": {"circle": {"type": "integer",
                                                                    "minimum": 1}},
                       "required": ["circle"], "additionalProperties": False},
                      {"type": "string", "enum": ["none", "unknown"]},
                      {"type": "array", "items": {"type": "boolean"}, "maxItems": 2}]}


def schemas() -> list[Schema]:
    out: list[Schema] = []
    for i in range(120):
        rng = random.Random(i)
        family = i % 8
        if family == 0:
            out.append(_object(rng, 1))
        elif family == 1:
            out.append(_object(rng, 2))
        elif family == 2:
            out.append(_array(rng, 2))
        elif family == 3:
            out.append({"anyOf": [_object(rng, 1), _leaf(rng)]})
        elif family == 4:
            out.append(_with_refs(rng))
        elif family == 5:
            out.append(_recursive(rng))
        elif family == 6:
            out.append(_one_of(rng) if i % 16 == 6 else _leaf(rng))
        else:
            out.append(_object(rng, 3))
    return out
