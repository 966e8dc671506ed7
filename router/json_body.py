"""Request bodies read with the limits first and pydantic last.

    raw bytes --size (413)--> json.loads (no NaN/Infinity, finite floats; bounded arrays)
              --list sizes (the caller's precheck)--> depth, int64, no lone surrogates--> pydantic

Python's json accepts NaN, Infinity and 1e999 (which reads as inf), recurses without a depth limit
of its own worth speaking of, and reads integers of any size: each would otherwise reach the
validation models, or the protobuf messages behind them, as a surprise. Every refusal is a
RouterError in OpenAI's shape, never FastAPI's 422. A large body is parsed in a worker thread, so
the event loop serves other requests meanwhile; the top-level arrays the caller bounds (messages,
stop_token_ids, ...) are read one element at a time and refused as soon as they pass their bound,
so 120,000 messages cost 1,025 messages' parsing, not a long hold of the GIL.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable, Mapping
from json.decoder import WHITESPACE, JSONDecodeError, scanstring
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from pagedserve.router.errors import RouterError, invalid_request
from pagedserve.router.limits import INT64_MAX, INT64_MIN

M = TypeVar("M", bound=BaseModel)
Precheck = Callable[[Any], None]
OFF_LOOP_BYTES = 64 << 10  # bodies past this parse in a thread (below, the hop costs more)


def too_large(limit: int) -> RouterError:
    return RouterError(f"request body is larger than {limit} bytes", 413,
                       "invalid_request_error", None, "request_too_large")


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refused with 413 as soon as it passes `limit` bytes (declared or read)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large(limit)
    return bytes(body)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:32]} is out of range")
    return value


_DECODER = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite_float)


def _skip(text: str, at: int) -> int:
    return WHITESPACE.match(text, at).end()  # type: ignore[union-attr]


def _expect(text: str, at: int, char: str, what: str) -> int:
    """The index after `char` at `at`, else the error json.loads would give."""
    if not text.startswith(char, at):
        raise JSONDecodeError(f"Expecting {what}", text, at)
    return _skip(text, at + 1)


def _bounded_array(text: str, at: int, key: str, bound: int) -> tuple[list, int]:
    """The array at `at` (its '['), element by element; 400 naming key past bound elements."""
    items: list[Any] = []
    at = _skip(text, at + 1)
    while not text.startswith("]", at):
        if len(items) == bound:
            raise invalid_request(f"{key} may have at most {bound} entries", key)
        if items:
            at = _expect(text, at, ",", "',' delimiter")
        value, at = _DECODER.raw_decode(text, at)
        items.append(value)
        at = _skip(text, at)
    return items, at + 1


def _loads(text: str, bounded: Mapping[str, int]) -> Any:
    """json.loads(text), except that a top-level object's arrays named in `bounded` go through
    _bounded_array. Duplicate keys, errors and whitespace are as json.loads has them."""
    at = _skip(text, 0)
    if not bounded or not text.startswith("{", at):
        return _DECODER.decode(text)
    out: dict[str, Any] = {}
    at = _skip(text, at + 1)
    while not text.startswith("}", at):
        if out:
            at = _expect(text, at, ",", "',' delimiter")
        if not text.startswith('"', at):
            raise JSONDecodeError("Expecting property name enclosed in double quotes", text, at)
        key, at = scanstring(text, at + 1)
        at = _expect(text, _skip(text, at), ":", "':' delimiter")
        if key in bounded and text.startswith("[", at):
            out[key], at = _bounded_array(text, at, key, bounded[key])
        else:
            out[key], at = _DECODER.raw_decode(text, at)
        at = _skip(text, at)
    if _skip(text, at + 1) != len(text):
        raise JSONDecodeError("Extra data", text, _skip(text, at + 1))
    return out


def parse_json(raw: bytes, max_depth: int, precheck: Precheck | None = None,
               bounded: Mapping[str, int] | None = None) -> Any:
    """Strict JSON: no NaN or Infinity, finite floats, 64-bit integers, nested at most max_depth;
    bounded: top-level arrays refused past their size as they are read; precheck sees the
    parsed value first (list sizes: cheaper than walking a huge list)."""
    if not raw.strip():
        raise invalid_request("the request body is empty; send a JSON object")
    try:
        value = _loads(raw.decode(json.detect_encoding(raw), "surrogatepass"), bounded or {})
    except RecursionError:
        raise invalid_request(f"JSON nested deeper than {max_depth} levels") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise invalid_request(f"the request body is not valid JSON: {e}") from None
    if precheck is not None:
        precheck(value)
    check_tree(value, max_depth)
    return value


def _check_leaf(x: Any) -> None:
    """Integers fit in 64 bits; strings are real Unicode (JSON's \\ud800 escapes can write lone
    surrogates, which no tokenizer or encoder takes)."""
    if type(x) is int:
        if not INT64_MIN <= x <= INT64_MAX:
            raise invalid_request("integers must fit in 64 bits")
    elif type(x) is str and not x.isascii():
        try:
            x.encode("utf-8")
        except UnicodeEncodeError:
            raise invalid_request("strings must not hold lone surrogates (\\ud800-\\udfff)"
                                  ) from None


def check_tree(value: Any, max_depth: int) -> None:
    """Depth, integer range and string encoding of a parsed JSON value, without recursion."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, (dict, list)):
            _check_leaf(node)
            continue
        if depth > max_depth:
            raise invalid_request(f"JSON nested deeper than {max_depth} levels")
        if isinstance(node, dict):
            for key in node:
                _check_leaf(key)
        for child in node.values() if isinstance(node, dict) else node:
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))
            else:
                _check_leaf(child)


def _param(loc: tuple) -> str | None:
    return str(loc[0]) if loc else None


def validation_error(e: ValidationError) -> RouterError:
    """The first few problems as one message; param is the top-level field of the first."""
    errors = e.errors(include_url=False, include_input=False)
    parts = [f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}" for err in errors[:4]]
    if len(errors) > 4:
        parts.append(f"and {len(errors) - 4} more")
    return invalid_request("; ".join(parts) or "invalid request",
                           _param(errors[0]["loc"]) if errors else None)


def validate(model: type[M], value: Any) -> M:
    if not isinstance(value, dict):
        raise invalid_request("the request body must be a JSON object")
    try:
        return model.model_validate(value)
    except ValidationError as e:
        raise validation_error(e) from None


def _parse_model(raw: bytes, model: type[M], max_depth: int, precheck: Precheck | None,
                 bounded: Mapping[str, int] | None) -> M:
    return validate(model, parse_json(raw, max_depth, precheck, bounded))


async def read_model(request: Request, model: type[M], max_bytes: int, max_depth: int,
                     precheck: Precheck | None = None,
                     bounded: Mapping[str, int] | None = None) -> M:
    """The body of `request` as `model`, through every check above."""
    raw = await read_body(request, max_bytes)
    if len(raw) <= OFF_LOOP_BYTES:
        return _parse_model(raw, model, max_depth, precheck, bounded)
    return await asyncio.to_thread(_parse_model, raw, model, max_depth, precheck, bounded)
