"""One chat choice's output text split into what the response shows: reasoning_content (with
--reasoning-parser), content, tool_calls (with tools), as streamed deltas and as a whole message.

    text ──ReasoningStream──> reasoning_content
                     └──answer──> ToolCallStream ──> content, tool_calls   (or content as is)

Both stages send only what grew, so the deltas of a stream concatenate to the whole message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pagedserve.router.reasoning import ReasoningStream
from pagedserve.router.tool_stream import ToolCallStream
from pagedserve.router.tools import ToolPlan


@dataclass
class ChatOutput:
    reasoning: ReasoningStream | None
    tools: ToolCallStream | None
    _reasoning_text: list[str] = field(default_factory=list)
    _content_text: list[str] = field(default_factory=list)

    @classmethod
    def for_request(cls, plan: ToolPlan, reasoning_parser: str | None) -> ChatOutput:
        tools = ToolCallStream(plan.parse, plan.max_calls) if plan.parse is not None else None
        reasoning = ReasoningStream(reasoning_parser) if reasoning_parser else None
        return cls(reasoning, tools)

    def feed(self, text: str, final: bool = False) -> dict[str, Any]:
        """The chat delta for this much more text ({} when nothing is ready)."""
        delta: dict[str, Any] = {}
        if self.reasoning is not None:
            thought, text = self.reasoning.feed(text, final)
            if thought:
                delta["reasoning_content"] = thought
                self._reasoning_text.append(thought)
        if self.tools is not None:
            delta.update(self.tools.feed(text, final))
        elif text:
            delta["content"] = text
        if "content" in delta:
            self._content_text.append(delta["content"])
        return delta

    def message(self) -> dict[str, Any]:
        """The whole message, once the final text was fed."""
        content: str | None = "".join(self._content_text)
        out: dict[str, Any] = {"role": "assistant"}
        if self.tools is not None:
            content, calls = self.tools.message()
            if calls:
                out["tool_calls"] = calls
        out["content"] = content
        if self.reasoning is not None:
            out["reasoning_content"] = "".join(self._reasoning_text) or None
        return out

    @property
    def has_calls(self) -> bool:
        return self.tools is not None and self.tools.has_calls
