"""What `LLM.generate` returns, shaped as vLLM users expect."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None  # None unless logprobs were asked for
    logprobs: list[dict[int, float]] | None  # one dict per generated token: token id -> logprob
    finish_reason: str | None = None  # 'stop' or 'length'
    # LLM.chat where tool calls are read (tool_choice required or named, or a tool_call_parser):
    # the text without the calls (None beside calls when empty), and the calls as OpenAI's
    # chat API gives them ({"id", "type": "function", "function": {"name", "arguments"}})
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True
