"""Request bodies read with the limits first and pydantic last.

    raw bytes --size (413)--> json.loads (no NaN/Infinity, finite floats)
              --depth, int64, no lone surrogates--> pydantic

Python's json accepts NaN, Infinity and 1e999 (which reads as inf), recurses without a depth limit
of its own worth speaking of, and reads integers of any size: each would otherwise reach the
validation models, or the protobuf messages behind them, as a surprise. Every refusal is a
RouterError in OpenAI's shape, never FastAPI's 422.
"""

from __future__ import annotations

import json
import math
from typing import Any, TypeVar

from pagedserve.router.errors import RouterError, invalid_request
from pagedserve.router.limits import INT64_MAX, INT64_MIN
from pydantic import BaseModel, ValidationError
from starlette.requests import Request

M = TypeVar("M", bound=BaseModel)


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


def parse_json(raw: bytes, max_depth: int) -> Any:
    """Strict JSON: no NaN or Infinity, finite floats, 64-bit integers, nested at most max_depth."""
    if not raw.strip():
        raise invalid_request("the request body is empty; send a JSON object")
    try:
        value = json.loads(raw, parse_constant=_no_constant, parse_float=_finite_float)
    except RecursionError:
        raise invalid_request(f"JSON nested deeper than {max_depth} levels") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise invalid_request(f"the request body is not valid JSON: {e}") from None
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


async def read_model(request: Request, model: type[M], max_bytes: int, max_depth: int) -> M:
    """The body of `request` as `model`, through every check above."""
    return validate(model, parse_json(await read_body(request, max_bytes), max_depth))
