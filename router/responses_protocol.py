"""OpenAI's Responses API request (`POST /v1/responses`), turned into a chat completion request.

A response is a chat turn with other names: `input` (a string, or a list of messages and
function-call items) and `instructions` become messages, flat function `tools` become chat tools,
`text.format` becomes response_format, `max_output_tokens` max_tokens. The chat request then does
every check, so both endpoints refuse the same things; a refusal's param is renamed back to the
Responses field. Nothing is stored: `store: true` and `previous_response_id` are refused.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, ValidationError

from pagedserve.router.errors import RouterError, invalid_request
from pagedserve.router.limits import INT32_MAX, INT64_MAX, INT64_MIN
from pagedserve.router.openai_protocol import ChatCompletionRequest, _Body

# chat field (or its prefix) -> the Responses field a refusal names
_PARAMS = {"messages": "input", "max_tokens": "max_output_tokens",
           "max_completion_tokens": "max_output_tokens", "response_format": "text.format"}


class ResponsesRequest(_Body):
    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    text: dict[str, Any] | None = None
    max_output_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    temperature: float | None = Field(None, ge=0.0, le=100.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stream: bool = False
    store: bool = False
    previous_response_id: str | None = None
    metadata: dict[str, Any] | None = None
    user: str | None = None

    def to_chat(self) -> ChatCompletionRequest:
        """The equivalent chat request (checked as one); 400 naming the Responses field."""
        if self.store:
            raise invalid_request("store is not supported: this server keeps no responses",
                                  "store")
        if self.previous_response_id is not None:
            raise invalid_request("previous_response_id is not supported: this server keeps "
                                  "no responses; send the conversation in input",
                                  "previous_response_id")
        fields: dict[str, Any] = {
            "model": self.model, "messages": self._messages(), "tools": self._tools(),
            "tool_choice": self._tool_choice(), "parallel_tool_calls": self.parallel_tool_calls,
            "response_format": self._format(), "max_tokens": self.max_output_tokens,
            "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed,
            "user": self.user}
        try:
            return ChatCompletionRequest.model_validate(fields)
        except ValidationError as e:
            loc = e.errors()[0].get("loc", ()) if e.errors() else ()
            raise invalid_request(f"invalid request: {e.errors()[0].get('msg', e)}",
                                  responses_param(str(loc[0]) if loc else None)) from None

    def _messages(self) -> list[dict[str, Any]]:
        out = [{"role": "system", "content": self.instructions}] if self.instructions else []
        if isinstance(self.input, str):
            return [*out, {"role": "user", "content": self.input}]
        for i, item in enumerate(self.input):
            out.append(_message(item, i))
        return out

    def _tools(self) -> list[dict[str, Any]] | None:
        if self.tools is None:
            return None
        out = []
        for i, tool in enumerate(self.tools):
            if not isinstance(tool, dict) or tool.get("type") != "function":
                raise invalid_request(f"tools[{i}]: only function tools are supported", "tools")
            fn = {k: tool[k] for k in ("name", "description", "parameters", "strict")
                  if k in tool}
            out.append({"type": "function", "function": fn})
        return out

    def _tool_choice(self) -> Any:
        choice = self.tool_choice
        if isinstance(choice, dict) and choice.get("type") == "function" and "name" in choice:
            return {"type": "function", "function": {"name": choice["name"]}}
        return choice

    def _format(self) -> dict[str, Any] | None:
        fmt = (self.text or {}).get("format")
        if fmt is None or not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
            return fmt
        spec = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        return {"type": "json_schema", "json_schema": spec}


def _message(item: Any, i: int) -> dict[str, Any]:
    """One input item as a chat message."""
    if not isinstance(item, dict):
        raise invalid_request(f"input[{i}] must be an object", "input")
    kind = item.get("type", "message")
    if kind == "function_call":
        call = {"id": item.get("call_id"), "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments", "")}}
        return {"role": "assistant", "content": None, "tool_calls": [call]}
    if kind == "function_call_output":
        return {"role": "tool", "tool_call_id": item.get("call_id"),
                "content": item.get("output", "")}
    if kind != "message":
        raise invalid_request(f"input[{i}]: items of type {kind!r} are not supported", "input")
    content = item.get("content")
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in ("input_text",
                                                                      "output_text"):
                raise invalid_request(f"input[{i}]: only text content is supported", "input")
            parts.append({"type": "text", "text": part.get("text")})
        content = parts
    return {"role": item.get("role"), "content": content}


def responses_param(param: str | None) -> str | None:
    """A chat request's field as the Responses request names it."""
    if param is None:
        return None
    head, dot, rest = param.partition(".")
    return _PARAMS.get(head, head) + (dot + rest if head != "response_format" else "")


def renamed(e: RouterError) -> RouterError:
    e.param = responses_param(e.param)
    return e
