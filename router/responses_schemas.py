"""What `POST /v1/responses` answers, as pydantic models, for /openapi.json only.

router/responses.py builds the response object and its streaming events as plain dicts; these
models say what those dicts hold, field by field (as router/openapi_schemas.py does for the other
endpoints: a field without a default is always present, extra fields are forbidden), and
tests/router/test_openapi.py holds the server to them with Schemathesis. The request's own
`tools`, `tool_choice`, `text` and `metadata` are echoed back as the client sent them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, RootModel

ItemStatus = Literal["in_progress", "completed"]  # in_progress: only in output_item.added


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OutputText(_Out):
    type: Literal["output_text"]
    text: str
    annotations: list[dict[str, Any]] = Field(max_length=0, description="always empty")


class ReasoningText(_Out):
    type: Literal["reasoning_text"]
    text: str


class ReasoningItem(_Out):
    """The model's thinking (servers started with --reasoning-parser)."""

    type: Literal["reasoning"]
    id: str
    summary: list[dict[str, Any]] = Field(max_length=0, description="always empty")
    content: list[ReasoningText] = Field(min_length=1, max_length=1)
    status: ItemStatus


class MessageItem(_Out):
    type: Literal["message"]
    id: str
    status: ItemStatus
    role: Literal["assistant"]
    content: list[OutputText] = Field(min_length=1, max_length=1)


class FunctionCallItem(_Out):
    """A call of one of the request's function tools; arguments are JSON text."""

    type: Literal["function_call"]
    id: str
    call_id: str
    name: str
    arguments: str
    status: ItemStatus


OutputItem = Annotated[ReasoningItem | MessageItem | FunctionCallItem,
                       Field(discriminator="type")]


class IncompleteDetails(_Out):
    reason: Literal["max_output_tokens"]


class InputTokensDetails(_Out):
    cached_tokens: int


class OutputTokensDetails(_Out):
    reasoning_tokens: int


class ResponseUsage(_Out):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens_details: OutputTokensDetails


class ResponseObject(_Out):
    """A response, whole or (in streaming events) as it stands; nothing is stored."""

    id: str
    object: Literal["response"]
    created_at: int
    status: Literal["in_progress", "completed", "incomplete"] = Field(
        description="incomplete: cut by max_output_tokens")
    model: str
    output: list[OutputItem]
    error: None
    incomplete_details: IncompleteDetails | None
    instructions: str | None
    tools: list[dict[str, Any]]
    tool_choice: str | dict[str, Any]
    parallel_tool_calls: bool
    text: dict[str, Any]
    temperature: float | None
    top_p: float | None
    max_output_tokens: int | None
    store: Literal[False]
    previous_response_id: None
    metadata: dict[str, Any]
    usage: ResponseUsage | None = Field(description="null until the response is done")


# -- streaming events ---------------------------------------------------------------------------
class _Event(_Out):
    sequence_number: int = Field(description="0, 1, 2, ... in the order sent")


class ResponseLifecycleEvent(_Event):
    type: Literal["response.created", "response.in_progress", "response.completed",
                  "response.incomplete"]
    response: ResponseObject


class OutputItemEvent(_Event):
    type: Literal["response.output_item.added", "response.output_item.done"]
    output_index: int
    item: OutputItem


class ContentPartEvent(_Event):
    type: Literal["response.content_part.added", "response.content_part.done"]
    item_id: str
    output_index: int
    content_index: int
    part: OutputText


class TextDeltaEvent(_Event):
    type: Literal["response.output_text.delta", "response.reasoning_text.delta"]
    item_id: str
    output_index: int
    content_index: int
    delta: str


class TextDoneEvent(_Event):
    type: Literal["response.output_text.done", "response.reasoning_text.done"]
    item_id: str
    output_index: int
    content_index: int
    text: str


class ArgumentsDeltaEvent(_Event):
    type: Literal["response.function_call_arguments.delta"]
    item_id: str
    output_index: int
    delta: str


class ArgumentsDoneEvent(_Event):
    type: Literal["response.function_call_arguments.done"]
    item_id: str
    output_index: int
    arguments: str


class ErrorEvent(_Event):
    """An error after the stream began (before it, the request gets an HTTP status)."""

    type: Literal["error"]
    code: str | None
    message: str
    param: str | None


_EVENTS = (ResponseLifecycleEvent, OutputItemEvent, ContentPartEvent, TextDeltaEvent,
           TextDoneEvent, ArgumentsDeltaEvent, ArgumentsDoneEvent, ErrorEvent)


class ResponseStreamEvent(RootModel[Annotated[
        ResponseLifecycleEvent | OutputItemEvent | ContentPartEvent | TextDeltaEvent
        | TextDoneEvent | ArgumentsDeltaEvent | ArgumentsDoneEvent | ErrorEvent,
        Field(discriminator="type")]]):
    """The JSON of one streaming event; the SSE `event:` line repeats its type."""


EVENT_NAMES: tuple[str, ...] = tuple(name for model in _EVENTS
                                     for name in get_args(model.model_fields["type"].annotation))
MODELS: tuple[type[BaseModel], ...] = (ResponseObject, ResponseStreamEvent)
