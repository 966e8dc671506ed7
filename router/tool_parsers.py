"""Tool-call parsers: a model's output text -> content and tool calls, for text still arriving too.

Every parser is one function `parse(text, final) -> Parsed`, called on the whole text so far.
It must be monotone, which is what makes streaming exact (router/tool_stream.py sends only what
grows): for a longer text, `content` and each call's `arguments` only grow, calls are only added,
and a name, once there, never changes. So content stops at the first tool-call marker (text after
a malformed call is dropped, never turned back into content), arguments are the raw JSON the model
wrote cut where the value ends, and a parser that cannot yet tell content from a call says
`decided=False` and the stream holds everything back.

Formats (`--tool-call-parser`):
  hermes       <tool_call>{"name": ..., "arguments": {...}}</tool_call> ...  (Qwen2.5 / Qwen3, Hermes)
  llama3_json  {"name": ..., "parameters": {...}}; {...}   (Llama 3.1+, optional <|python_tag|>)
  mistral      [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]  or  [TOOL_CALLS]name[ARGS]{...}
  pythonic     [get_weather(city="Paris"), other(x=1)]   (Llama 3.2 / 4 pythonic)
and two the router uses for tool_choice required (a JSON array of {"name", "parameters"}) and a
named function (the output is its arguments). Adding one: a parse function and a PARSERS line.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from pagedserve.router.partial_json import scan_object, scan_string, scan_value, skip_ws


@dataclass
class PartialCall:
    name: str | None  # once its text is complete
    arguments: str  # raw JSON text of the arguments so far
    done: bool = False  # the call's text is complete


@dataclass
class Parsed:
    content: str
    calls: list[PartialCall] = field(default_factory=list)
    decided: bool = True  # False: the text could still turn out either way; hold it back


UNDECIDED = Parsed("", [], decided=False)


def _held(text: str, marker: str, final: bool) -> str:
    """text without a tail that could be the start of marker (unless the text is final)."""
    if final:
        return text
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return text[:-k]
    return text


def _json_call(text: str, start: int, args_keys: tuple[str, ...] = ("arguments", "parameters")
               ) -> tuple[PartialCall, int | None]:
    """The call object at text[start] ('{'): its name and raw arguments so far, and the index
    after it once complete. ValueError when it cannot be such an object."""
    scan = scan_object(text, start)
    name = None
    if "name" in scan.fields and scan.fields["name"][1] is not None:
        vs, ve = scan.fields["name"]
        name = json.loads(text[vs:ve])
        if not isinstance(name, str):
            raise ValueError("a tool call's name must be a string")
    key = next((k for k in args_keys if k in scan.fields), None)
    if key is None:
        arguments = "{}" if scan.end is not None else ""
    else:
        vs, ve = scan.fields[key]
        raw = text[vs:ve if ve is not None else len(text)]
        if raw.startswith('"'):  # arguments given as a JSON string: whole, once complete
            raw = json.loads(raw) if ve is not None else ""
        arguments = raw
    return PartialCall(name, arguments, scan.end is not None), scan.end


def _json_calls(text: str, pos: int, separator: str) -> list[PartialCall]:
    """Call objects from pos on, separated by `separator`, until anything else or the end."""
    calls: list[PartialCall] = []
    while True:
        pos = skip_ws(text, pos)
        if pos >= len(text) or text[pos] != "{":
            return calls
        try:
            call, end = _json_call(text, pos)
        except ValueError:
            return calls  # malformed: the rest is dropped
        calls.append(call)
        if end is None:
            return calls
        pos = skip_ws(text, end)
        if not text.startswith(separator, pos):
            return calls
        pos += len(separator)


def hermes(text: str, final: bool) -> Parsed:
    open_, close = "<tool_call>", "</tool_call>"
    at = text.find(open_)
    if at < 0:
        return Parsed(_held(text, open_, final))
    calls, pos = [], at
    while text.startswith(open_, pos):
        pos = skip_ws(text, pos + len(open_))
        if pos >= len(text) or text[pos] != "{":
            break
        try:
            call, end = _json_call(text, pos)
        except ValueError:
            break  # malformed: the rest is dropped
        calls.append(call)
        if end is None:
            break
        pos = skip_ws(text, end)
        if not text.startswith(close, pos):
            break
        pos = skip_ws(text, pos + len(close))
    return Parsed(text[:at], calls)


def llama3_json(text: str, final: bool) -> Parsed:
    tag = "<|python_tag|>"
    i = skip_ws(text, 0)
    if text.startswith(tag, i):
        i = skip_ws(text, i + len(tag))
    elif tag.startswith(text[i:]) and i < len(text) and not final:
        return UNDECIDED
    if i >= len(text):
        return Parsed(text) if final else UNDECIDED
    if text[i] != "{":
        return Parsed(text)
    try:
        first = next(iter(scan_object(text, i).fields), None)
    except ValueError:
        return Parsed(text)
    if first is None:
        return Parsed(text) if final else UNDECIDED
    if first != "name":
        return Parsed(text)
    return Parsed("", _json_calls(text, i, ";"))


def mistral(text: str, final: bool) -> Parsed:
    marker = "[TOOL_CALLS]"
    at = text.find(marker)
    if at < 0:
        return Parsed(_held(text, marker, final))
    pos = skip_ws(text, at + len(marker))
    if pos < len(text) and text[pos] == "[":
        return Parsed(text[:at], _json_calls(text, pos + 1, ","))
    calls = []  # the newer form: name[ARGS]{...}, repeated after [TOOL_CALLS]
    for m in re.finditer(r"\[TOOL_CALLS\]\s*([^\[\s]+)\[ARGS\]", text[at:]):
        start = at + m.end()
        arguments, done = _raw_value(text, start)
        calls.append(PartialCall(m.group(1), arguments, done))
        if not done:
            break
    return Parsed(text[:at], calls)


def _raw_value(text: str, start: int) -> tuple[str, bool]:
    start = skip_ws(text, start)
    try:
        end = scan_value(text, start)
    except ValueError:
        return "", False
    return text[start:end if end is not None else len(text)], end is not None


_PY_CALL = re.compile(r"\s*([A-Za-z_][\w.]*)\s*\(")
_PY_START = re.compile(r"\s*(\[\s*([A-Za-z_][\w.]*\s*)?)?")


def pythonic(text: str, final: bool) -> Parsed:
    m = re.match(r"\s*\[", text)
    if m is None or _PY_CALL.match(text, m.end()) is None:
        undecided = _PY_START.fullmatch(text) is not None and not final
        return UNDECIDED if undecided else Parsed(text)
    calls, pos = [], m.end()
    while (call := _PY_CALL.match(text, pos)) is not None:
        close = _closing_paren(text, call.end())
        if close is None:
            calls.append(PartialCall(call.group(1), ""))
            break
        arguments = _python_kwargs(text[call.start(1):close + 1])
        if arguments is None:
            break
        calls.append(PartialCall(call.group(1), arguments, True))
        pos = skip_ws(text, close + 1)
        if not text.startswith(",", pos):
            break
        pos += 1
    return Parsed("", calls)


def _closing_paren(text: str, i: int) -> int | None:
    """The index of the ')' closing the call whose '(' is just before i (strings skipped)."""
    depth = 1
    while i < len(text):
        ch = text[i]
        if ch in "\"'":
            end = _py_string_end(text, i)
            if end is None:
                return None
            i = end
            continue
        depth += ch in "([{"
        depth -= ch in ")]}"
        if depth == 0:
            return i
        i += 1
    return None


def _py_string_end(text: str, i: int) -> int | None:
    if text[i] == '"':
        return scan_string(text, i)
    j = i + 1
    while j < len(text):
        if text[j] == "\\":
            j += 2
            continue
        if text[j] == "'":
            return j + 1
        j += 1
    return None


def _python_kwargs(call_src: str) -> str | None:
    """f(a=1, b="x") -> '{"a": 1, "b": "x"}'; None when it is not a call of literals."""
    try:
        node = ast.parse(call_src, mode="eval").body
        if not isinstance(node, ast.Call) or node.args:
            return None
        return json.dumps({k.arg: ast.literal_eval(k.value) for k in node.keywords},
                          ensure_ascii=False)
    except (SyntaxError, ValueError, TypeError):
        return None


def required_calls(text: str, final: bool) -> Parsed:
    """tool_choice required: the grammar made the output a JSON array of name/parameters."""
    pos = skip_ws(text, 0)
    if pos >= len(text) or text[pos] != "[":
        return Parsed("", [])
    return Parsed("", _json_calls(text, pos + 1, ","))


def named_call(name: str) -> Callable[[str, bool], Parsed]:
    """tool_choice naming a function: the grammar made the whole output its arguments."""
    def parse(text: str, final: bool) -> Parsed:
        return Parsed("", [PartialCall(name, text, final)])

    return parse


PARSERS: dict[str, Callable[[str, bool], Parsed]] = {
    "hermes": hermes, "llama3_json": llama3_json, "mistral": mistral, "pythonic": pythonic,
}
# Parsers whose markers are special tokens: their text must not be skipped in detokenizing.
KEEPS_SPECIAL_TOKENS = {"mistral", "llama3_json"}
