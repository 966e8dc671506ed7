"""The response bodies of the HTTP API as pydantic models, for /openapi.json only.

router/serving.py and router/app.py build the responses as plain dicts; these models say what
those dicts hold, field by field (a field without a default is always present, null or not; extra
fields are forbidden), and tests/router/test_openapi.py runs Schemathesis to check that every
answer matches them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

FinishReason = Literal["stop", "length", "abort"]
ChatFinishReason = Literal["stop", "length", "abort", "tool_calls"]


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(_Out):
    message: str
    type: str = Field(description="invalid_request_error, not_found_error, authentication_error, "
                                  "rate_limit_error, service_unavailable, internal_error, ...")
    param: str | None = Field(description="the request field at fault, when there is one")
    code: str | None


class ErrorResponse(_Out):
    """Every error, in OpenAI's shape."""

    error: ErrorDetail


class Usage(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


# -- completions --------------------------------------------------------------------------------
class CompletionLogprobs(_Out):
    """One entry per token; echoed prompt tokens have null logprobs."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(_Out):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason | None


class CompletionResponse(_Out):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunk(_Out):
    """One event of a streamed completion; usage only with stream_options.include_usage."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


# -- chat ---------------------------------------------------------------------------------------
class TopLogprob(_Out):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Out):
    content: list[TokenLogprob]


class FunctionCall(_Out):
    name: str
    arguments: str = Field(description="JSON text")


class ToolCall(_Out):
    id: str
    type: Literal["function"]
    function: FunctionCall


class AssistantMessage(_Out):
    """tool_calls with tools (then content may be null); reasoning_content with a server's
    --reasoning-parser."""

    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCall] = Field(default=None, min_length=1)
    reasoning_content: str | None = None


class ChatChoice(_Out):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: ChatFinishReason | None


class ChatCompletionResponse(_Out):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class FunctionCallDelta(_Out):
    name: str = ""
    arguments: str = Field(description="the next piece of the JSON text")


class ToolCallDelta(_Out):
    """A call's first delta has its id, type and name (arguments empty); later ones the next
    piece of its arguments."""

    index: int
    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCallDelta


class ChatDelta(_Out):
    """The first chunk of each choice has the role; later ones what grew, if anything."""

    role: Literal["assistant"] = "assistant"
    content: str = ""
    reasoning_content: str = ""
    tool_calls: list[ToolCallDelta] = Field(default=None, min_length=1)


class ChatChunkChoice(_Out):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: ChatFinishReason | None


class ChatCompletionChunk(_Out):
    """One event of a streamed chat completion; usage only with stream_options.include_usage."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


# -- the rest -----------------------------------------------------------------------------------
class Model(_Out):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str | None
    max_model_len: int | None = Field(description="null until the scheduler has answered")


class ModelList(_Out):
    object: Literal["list"]
    data: list[Model]


class TokenizeResponse(_Out):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: None


class DetokenizeResponse(_Out):
    prompt: str


class HealthStatus(_Out):
    status: str = Field(description="ok, or why the server cannot serve")


MODELS: tuple[type[BaseModel], ...] = (
    ErrorResponse, CompletionResponse, CompletionChunk, ChatCompletionResponse,
    ChatCompletionChunk, ModelList, TokenizeResponse, DetokenizeResponse, HealthStatus)
