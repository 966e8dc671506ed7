"""`POST /v1/responses`: a chat generation shaped as OpenAI's Responses API, whole or as its
streaming events.

Output items, in order: a reasoning item (with --reasoning-parser), a message with one
output_text part, function_call items. Streaming opens an item when its first delta arrives and
closes the one before it, so the items of `response.completed` are what the deltas built:

    response.created, response.in_progress
    response.output_item.added (reasoning)  response.reasoning_text.delta ...  (.done, item done)
    response.output_item.added (message)    response.content_part.added
        response.output_text.delta ...      response.output_text.done  content_part.done  item done
    response.output_item.added (function_call)  response.function_call_arguments.delta ... (.done)
    response.completed (or response.incomplete when cut by max_output_tokens)
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import structlog

from pagedserve.router.errors import RouterError, internal_error
from pagedserve.router.responses_protocol import ResponsesRequest
from pagedserve.router.serving import ChatGeneration

log = structlog.get_logger("pagedserve.router")


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _reasoning_item(text: str, item_id: str | None = None) -> dict[str, Any]:
    return {"type": "reasoning", "id": item_id or _id("rs"), "summary": [],
            "content": [{"type": "reasoning_text", "text": text}], "status": "completed"}


def _message_item(text: str, item_id: str | None = None) -> dict[str, Any]:
    return {"type": "message", "id": item_id or _id("msg"), "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}


def _call_item(call: dict[str, Any], item_id: str | None = None) -> dict[str, Any]:
    return {"type": "function_call", "id": item_id or _id("fc"), "call_id": call["id"],
            "name": call["function"]["name"], "arguments": call["function"]["arguments"],
            "status": "completed"}


def items_of(message: dict[str, Any]) -> list[dict[str, Any]]:
    """A chat message as Responses output items."""
    items = []
    if message.get("reasoning_content"):
        items.append(_reasoning_item(message["reasoning_content"]))
    if message.get("content"):
        items.append(_message_item(message["content"]))
    items += [_call_item(c) for c in message.get("tool_calls") or ()]
    return items


class ResponsesGeneration:
    def __init__(self, gen: ChatGeneration, body: ResponsesRequest) -> None:
        self.gen, self.body = gen, body
        self.id = "resp_" + gen.id.partition("-")[2]
        self.created = int(time.time())

    def response(self, items: list[dict[str, Any]], finish: str | None,
                 usage: dict[str, int] | None) -> dict[str, Any]:
        """The response object (status from finish: None while it runs)."""
        status = ("in_progress" if finish is None
                  else "incomplete" if finish == "length" else "completed")
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "model": self.gen.model, "output": items, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if finish == "length" else None,
            "instructions": self.body.instructions, "tools": self.body.tools or [],
            "tool_choice": self.body.tool_choice or ("auto" if self.body.tools else "none"),
            "parallel_tool_calls": self.body.parallel_tool_calls,
            "text": self.body.text or {"format": {"type": "text"}},
            "temperature": self.body.temperature, "top_p": self.body.top_p,
            "max_output_tokens": self.body.max_output_tokens, "store": False,
            "previous_response_id": None, "metadata": self.body.metadata or {},
            "usage": None if usage is None else {
                "input_tokens": usage["prompt_tokens"], "output_tokens":
                usage["completion_tokens"], "total_tokens": usage["total_tokens"],
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens_details": {"reasoning_tokens": 0}},
        }

    async def whole(self) -> dict[str, Any]:
        chat = await self.gen.whole()
        choice = chat["choices"][0]
        return self.response(items_of(choice["message"]), choice["finish_reason"],
                             chat["usage"])

    async def open(self) -> None:
        await self.gen.open()

    async def events(self) -> AsyncIterator[str]:
        """The SSE events of the whole generation; an error after the start is an error
        event."""
        stream = _EventStream(self)
        try:
            for event in stream.start():
                yield event
            async with contextlib.aclosing(self.gen._opened()) as deltas:
                async for d in deltas:
                    for event in stream.delta(self.gen.chunk_choice(d)["delta"]):
                        yield event
                    if d.finish_reason is not None:
                        usage = self.gen._usage(d.completion_tokens)
                        finish = self.gen._finish(d.finish_reason, self.gen._outputs.get(0))
                        for event in stream.finish(finish, usage):
                            yield event
        except RouterError as e:
            yield stream.event("error", code=e.code, message=e.message, param=e.param)
        except Exception:
            log.exception("internal error while streaming a response")
            e = internal_error(self.gen.id)
            yield stream.event("error", code=e.code, message=e.message, param=None)


class _EventStream:
    """The Responses streaming events for a sequence of chat deltas."""

    def __init__(self, owner: ResponsesGeneration) -> None:
        self.owner = owner
        self.seq = 0
        self.items: list[dict[str, Any]] = []
        self.open: str | None = None  # the kind of the last item while it is open

    def event(self, kind: str, **data: Any) -> str:
        payload = {"type": kind, "sequence_number": self.seq, **data}
        self.seq += 1
        return f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"

    def start(self) -> list[str]:
        response = self.owner.response([], None, None)
        return [self.event("response.created", response=response),
                self.event("response.in_progress", response=response)]

    def _add(self, item: dict[str, Any]) -> list[str]:
        out = self._close()
        self.items.append(item)
        self.open = item["type"]
        index = len(self.items) - 1
        out.append(self.event("response.output_item.added", output_index=index,
                              item={**item, "status": "in_progress"}))
        if item["type"] == "message":
            out.append(self.event("response.content_part.added", item_id=item["id"],
                                  output_index=index, content_index=0,
                                  part={"type": "output_text", "text": "", "annotations": []}))
        return out

    def _close(self) -> list[str]:
        if self.open is None:
            return []
        item, index = self.items[-1], len(self.items) - 1
        where = {"item_id": item["id"], "output_index": index}
        out = []
        if item["type"] == "reasoning":
            out.append(self.event("response.reasoning_text.done", **where, content_index=0,
                                  text=item["content"][0]["text"]))
        elif item["type"] == "message":
            part = item["content"][0]
            out += [self.event("response.output_text.done", **where, content_index=0,
                               text=part["text"]),
                    self.event("response.content_part.done", **where, content_index=0,
                               part=part)]
        else:
            out.append(self.event("response.function_call_arguments.done", **where,
                                  arguments=item["arguments"]))
        out.append(self.event("response.output_item.done", output_index=index, item=item))
        self.open = None
        return out

    def delta(self, delta: dict[str, Any]) -> list[str]:
        out: list[str] = []
        if delta.get("reasoning_content"):
            if self.open != "reasoning":
                out += self._add(_reasoning_item(""))
            self.items[-1]["content"][0]["text"] += delta["reasoning_content"]
            out.append(self.event("response.reasoning_text.delta", item_id=self.items[-1]["id"],
                                  output_index=len(self.items) - 1, content_index=0,
                                  delta=delta["reasoning_content"]))
        if delta.get("content"):
            if self.open != "message":
                out += self._add(_message_item(""))
            self.items[-1]["content"][0]["text"] += delta["content"]
            out.append(self.event("response.output_text.delta", item_id=self.items[-1]["id"],
                                  output_index=len(self.items) - 1, content_index=0,
                                  delta=delta["content"]))
        for tc in delta.get("tool_calls", ()):
            if "id" in tc:
                out += self._add(_call_item({"id": tc["id"], "function": tc["function"]}))
            fragment = tc.get("function", {}).get("arguments", "")
            if fragment and "id" not in tc:
                self.items[-1]["arguments"] += fragment
                out.append(self.event("response.function_call_arguments.delta",
                                      item_id=self.items[-1]["id"],
                                      output_index=len(self.items) - 1, delta=fragment))
        return out

    def finish(self, finish: str | None, usage: dict[str, int]) -> list[str]:
        out = self._close()
        response = self.owner.response(self.items, finish, usage)
        kind = "response.incomplete" if finish == "length" else "response.completed"
        return [*out, self.event(kind, response=response)]
