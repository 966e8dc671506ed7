"""What `LLM.generate` returns, shaped as vLLM users expect."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None  # None unless logprobs were asked for
    logprobs: list[dict[int, float]] | None  # one dict per generated token: token id -> logprob
    finish_reason: str | None = None  # 'stop' or 'length'


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True
