"""Just enough JSON scanning for text that is still arriving: where a value ends (or that it has
not ended yet), and an object's fields with their raw value spans.

Tool-call parsers stream a call's arguments as the raw text the model wrote, cut at the end of
the arguments value: each streamed prefix is then a prefix of the final arguments by
construction, so the concatenated stream equals the whole response.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

_WS = " \t\r\n"
_SCALAR_END = _WS + ",]}"


def skip_ws(s: str, i: int) -> int:
    while i < len(s) and s[i] in _WS:
        i += 1
    return i


def scan_string(s: str, i: int) -> int | None:
    """s[i] is '"': the index after the closing quote, or None when the text ends first."""
    i += 1
    while i < len(s):
        if s[i] == "\\":
            i += 2
            continue
        if s[i] == '"':
            return i + 1
        i += 1
    return None


def scan_value(s: str, i: int) -> int | None:
    """The index after the JSON value starting at s[i], or None when the text ends first.
    ValueError when what is there cannot be JSON."""
    if i >= len(s):
        return None
    if s[i] == '"':
        return scan_string(s, i)
    if s[i] in "{[":
        depth, j = 0, i
        while j < len(s):
            ch = s[j]
            if ch == '"':
                end = scan_string(s, j)
                if end is None:
                    return None
                j = end
                continue
            depth += ch in "{["
            depth -= ch in "}]"
            j += 1
            if depth == 0:
                return j
        return None
    j = i
    while j < len(s) and s[j] not in _SCALAR_END:
        j += 1
    if j == len(s):
        return None  # a number may go on
    try:
        json.loads(s[i:j])
    except ValueError:
        raise ValueError(f"not a JSON value at {i}: {s[i:j][:20]!r}") from None
    return j


@dataclass
class ObjectScan:
    """An object's fields so far: key -> (value start, value end or None while unfinished)."""

    fields: dict[str, tuple[int, int | None]] = field(default_factory=dict)
    end: int | None = None  # the index after its closing brace, once there


def scan_object(s: str, i: int) -> ObjectScan:
    """Fields of the object starting at s[i] ('{'), as far as the text goes; ValueError when it
    cannot be a JSON object."""
    if s[i] != "{":
        raise ValueError(f"not a JSON object at {i}")
    out, j = ObjectScan(), skip_ws(s, i + 1)
    if j < len(s) and s[j] == "}":
        out.end = j + 1
        return out
    while j < len(s):
        if s[j] != '"':
            raise ValueError(f"expected a key at {j}")
        key_end = scan_string(s, j)
        if key_end is None:
            return out
        key = json.loads(s[j:key_end])
        j = skip_ws(s, key_end)
        if j >= len(s):
            return out
        if s[j] != ":":
            raise ValueError(f"expected ':' at {j}")
        start = skip_ws(s, j + 1)
        if start >= len(s):
            return out
        end = scan_value(s, start)
        out.fields[key] = (start, end)
        if end is None:
            return out
        j = skip_ws(s, end)
        if j < len(s) and s[j] == "}":
            out.end = j + 1
            return out
        if j < len(s) and s[j] != ",":
            raise ValueError(f"expected ',' or '}}' at {j}")
        j = skip_ws(s, j + 1)
    return out
