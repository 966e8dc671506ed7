"""One choice's text through a tool-call parser: OpenAI chat deltas while it grows, and the whole
message at the end.

Each step re-parses the whole text so far and sends only what grew since the last step: new
content, a new call's id and name (its arguments start empty), then argument fragments. The
parsers are monotone (router/tool_parsers.py), so the deltas' concatenation is the whole message
by construction. Content that could still be followed by a tool call keeps its trailing
whitespace back (a message with calls has its content stripped at the end).

    text so far ──parse──> content, [call(name, arguments so far)]
                           └── minus what was sent ──> delta
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pagedserve.router.tool_parsers import Parsed, PartialCall

Parse = Callable[[str, bool], Parsed]


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCallStream:
    parse: Parse
    max_calls: int | None = None  # parallel_tool_calls false: 1
    text: str = ""
    _sent_content: int = 0
    _ids: list[str] = field(default_factory=list)
    _sent_arguments: list[int] = field(default_factory=list)

    def _result(self, final: bool) -> tuple[str, list[PartialCall]]:
        parsed = self.parse(self.text, final)
        if not parsed.decided:
            return "", []
        calls: list[PartialCall] = []
        for call in parsed.calls[:self.max_calls]:  # a call is sent once its name is known
            if call.name is None:
                break
            calls.append(call)
        content = parsed.content if final and not calls else parsed.content.rstrip()
        return content, calls

    def feed(self, text: str, final: bool = False) -> dict[str, Any]:
        """The chat delta for this much more text ({} when nothing is ready to send)."""
        self.text += text
        content, calls = self._result(final)
        delta: dict[str, Any] = {}
        if len(content) > self._sent_content:
            delta["content"] = content[self._sent_content:]
            self._sent_content = len(content)
        tool_deltas = []
        for i, call in enumerate(calls):
            if i == len(self._ids):
                self._ids.append(new_call_id())
                self._sent_arguments.append(0)
                tool_deltas.append({"index": i, "id": self._ids[i], "type": "function",
                                    "function": {"name": call.name, "arguments": ""}})
            if len(call.arguments) > self._sent_arguments[i]:
                tool_deltas.append({"index": i, "function": {
                    "arguments": call.arguments[self._sent_arguments[i]:]}})
                self._sent_arguments[i] = len(call.arguments)
        if tool_deltas:
            delta["tool_calls"] = tool_deltas
        return delta

    def message(self) -> tuple[str | None, list[dict[str, Any]]]:
        """The whole message from the whole text: content (None when empty beside calls) and
        tool calls, with the ids the stream already gave them."""
        content, calls = self._result(True)
        while len(self._ids) < len(calls):
            self._ids.append(new_call_id())
        tool_calls = [{"id": self._ids[i], "type": "function",
                       "function": {"name": c.name, "arguments": c.arguments}}
                      for i, c in enumerate(calls)]
        return (content or None) if tool_calls else content, tool_calls

    @property
    def has_calls(self) -> bool:
        return bool(self._ids)
