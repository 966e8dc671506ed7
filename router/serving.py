"""One API request's generation, shaped as a completions or chat response, whole or streamed.

A request is a list of prompts (one for chat) and, per prompt, `per_prompt` sequences: n, or
best_of for completions. Sequence j of prompt i is choice i * per_prompt + j, as OpenAI numbers
them. With best_of > n (not streamed) the candidates of each prompt are ranked by cumulative
logprob and the best n are answered as choices i * n + rank.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

import structlog

from pagedserve.router.chat_output import ChatOutput
from pagedserve.router.core import RouterCore, collect
from pagedserve.router.errors import RouterError, internal_error
from pagedserve.router.generation import ChoiceSpec, Delta, GenerationParams
from pagedserve.router.logprobs import CompletionLogprobs, chat_logprobs, merge_completion_logprobs
from pagedserve.router.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    SamplingRequest,
)
from pagedserve.router.tools import NO_TOOLS, ToolPlan

log = structlog.get_logger("pagedserve.router")


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    text: str = ""  # what echo shows


class Generation:
    endpoint = ""
    object_whole = object_chunk = ""

    def __init__(self, core: RouterCore, body: SamplingRequest, response_id: str,
                 prompts: list[Prompt], params: list[GenerationParams],
                 per_prompt: int) -> None:
        self.core, self.body, self.id = core, body, response_id
        self.prompts, self.per_prompt = prompts, per_prompt
        self.specs = [ChoiceSpec(i * per_prompt + j, p.ids, params[i].for_choice(j))
                      for i, p in enumerate(prompts) for j in range(per_prompt)]
        self.model = body.model or core.model_name
        self.created = int(time.time())
        self.num_top = body.num_logprobs()  # what the response shows; None: no logprobs

    # -- running ------------------------------------------------------------------------------
    def _deltas(self) -> AsyncIterator[Delta]:
        return self.core.stream(self.id, self.specs, self.endpoint)

    async def open(self) -> None:
        """Start and wait for the first delta, so that an error before any output (scheduler
        down, request refused, queue full) still gets its HTTP status instead of an SSE event."""
        self._stream = self._deltas()
        try:
            self._first = await anext(self._stream)
        except BaseException:
            await self._stream.aclose()
            raise

    async def _opened(self) -> AsyncIterator[Delta]:
        async with contextlib.aclosing(self._stream) as stream:
            yield self._first
            async for delta in stream:
                yield delta

    def _usage(self, completion_tokens: int) -> dict:
        prompt_tokens = sum(len(p.ids) for p in self.prompts)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def _response(self, choices: list[dict], completion_tokens: int) -> dict:
        return {"id": self.id, "object": self.object_whole, "created": self.created,
                "model": self.model, "choices": choices, "usage": self._usage(completion_tokens)}

    async def whole(self) -> dict:
        results = await collect(self._deltas(), len(self.specs))
        choices = [self.whole_choice(index, d) for index, d in self.chosen(results)]
        return self._response(choices, sum(d.completion_tokens for d in results))

    def chosen(self, results: list[Delta]) -> list[tuple[int, Delta]]:
        return [(d.index, d) for d in results]

    # -- streaming ----------------------------------------------------------------------------
    def _sse(self, choices: list[dict], usage_on: bool, usage: dict | None = None) -> str:
        chunk = {"id": self.id, "object": self.object_chunk, "created": self.created,
                 "model": self.model, "choices": choices}
        if usage_on:
            chunk["usage"] = usage
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    async def events(self) -> AsyncIterator[str]:
        """SSE events: the first choices, one chunk per delta with news, usage, [DONE]; an error
        after the first event is an error event (then [DONE])."""
        opts = self.body.stream_options
        usage_on = bool(opts and opts.include_usage)
        every = bool(usage_on and opts and opts.continuous_usage_stats)
        done: dict[int, int] = {}
        try:
            for choice in self.first_choices():
                yield self._sse([choice], usage_on, self._usage(0) if every else None)
            async with contextlib.aclosing(self._opened()) as deltas:
                async for d in deltas:
                    done[d.index] = d.completion_tokens
                    if d.text or d.finish_reason is not None or (
                            self.num_top is not None and d.token_ids):
                        usage = self._usage(sum(done.values())) if every else None
                        yield self._sse([self.chunk_choice(d)], usage_on, usage)
            if usage_on:
                yield self._sse([], True, self._usage(sum(done.values())))
        except RouterError as e:
            yield f"data: {json.dumps(e.to_dict())}\n\n"
        except Exception:
            log.exception("internal error while streaming")
            yield f"data: {json.dumps(internal_error(self.id).to_dict())}\n\n"
        yield "data: [DONE]\n\n"

    # -- the endpoint's shapes ----------------------------------------------------------------
    def first_choices(self) -> Iterable[dict]:
        return ()

    def chunk_choice(self, d: Delta) -> dict:
        raise NotImplementedError

    def whole_choice(self, index: int, d: Delta) -> dict:
        raise NotImplementedError


class CompletionGeneration(Generation):
    endpoint = "completions"
    object_whole = object_chunk = "text_completion"

    def __init__(self, core: RouterCore, body: CompletionRequest, response_id: str,
                 prompts: list[Prompt], params: list[GenerationParams]) -> None:
        super().__init__(core, body, response_id, prompts, params, body.candidates)
        self.n, self.echo = body.n, body.echo
        self._logprobs: dict[int, CompletionLogprobs] = {}

    def _prompt(self, index: int) -> Prompt:
        return self.prompts[index // self.n]

    def _lp(self, index: int) -> CompletionLogprobs:
        if index not in self._logprobs:
            self._logprobs[index] = CompletionLogprobs(self.core.tokenizer)
        return self._logprobs[index]

    def first_choices(self) -> Iterable[dict]:
        if not self.echo:
            return
        for index in range(len(self.prompts) * self.n):
            prompt = self._prompt(index)
            logprobs = None if self.num_top is None else self._lp(index).prompt(prompt.ids)
            self._lp(index).offset = len(prompt.text)
            yield {"index": index, "text": prompt.text, "logprobs": logprobs,
                   "finish_reason": None}

    def chunk_choice(self, d: Delta) -> dict:
        logprobs = None
        if self.num_top is not None:
            logprobs = self._lp(d.index).sampled(d.token_ids, d.logprobs or [],
                                                 d.top_logprobs or [])
        return {"index": d.index, "text": d.text, "logprobs": logprobs,
                "finish_reason": d.finish_reason}

    def chosen(self, results: list[Delta]) -> list[tuple[int, Delta]]:
        """All choices, or with best_of > n each prompt's n most likely candidates."""
        if self.per_prompt == self.n:
            return super().chosen(results)
        out = []
        for i in range(len(self.prompts)):
            group = results[i * self.per_prompt:(i + 1) * self.per_prompt]
            ranked = sorted(group, key=lambda d: -sum(d.logprobs or ()))
            out += [(i * self.n + rank, d) for rank, d in enumerate(ranked[:self.n])]
        return out

    def whole_choice(self, index: int, d: Delta) -> dict:
        prompt = self._prompt(index)
        text = (prompt.text if self.echo else "") + d.text
        logprobs = None
        if self.num_top is not None:
            acc = CompletionLogprobs(self.core.tokenizer)
            parts = [acc.prompt(prompt.ids)] if self.echo else []
            acc.offset = len(prompt.text) if self.echo else 0
            parts.append(acc.sampled(d.token_ids, d.logprobs or [], d.top_logprobs or []))
            logprobs = merge_completion_logprobs(parts)
        return {"index": index, "text": text, "logprobs": logprobs,
                "finish_reason": d.finish_reason}


class ChatGeneration(Generation):
    endpoint = "chat"
    object_whole, object_chunk = "chat.completion", "chat.completion.chunk"

    def __init__(self, core: RouterCore, body: ChatCompletionRequest, response_id: str,
                 prompt: Prompt, params: GenerationParams, tools: ToolPlan = NO_TOOLS) -> None:
        super().__init__(core, body, response_id, [prompt], [params], body.n)
        last = body.messages[-1]
        self.prefix = (last.template_dict().get("content") or ""
                       if body.echo and last.role == "assistant" else "")
        self.tools = tools
        self._split = tools.parse is not None or core.reasoning_parser is not None
        self._outputs: dict[int, ChatOutput] = {}  # per choice, when the text is split

    def _output(self, index: int) -> ChatOutput:
        if index not in self._outputs:
            self._outputs[index] = ChatOutput.for_request(self.tools, self.core.reasoning_parser)
        return self._outputs[index]

    def _logprobs(self, d: Delta) -> dict | None:
        if self.num_top is None:
            return None
        return chat_logprobs(self.core.tokenizer, d.token_ids, d.logprobs or [],
                             d.top_logprobs or [], self.num_top)

    @staticmethod
    def _finish(reason: str | None, output: ChatOutput | None) -> str | None:
        return "tool_calls" if reason == "stop" and output and output.has_calls else reason

    def first_choices(self) -> Iterable[dict]:
        return [{"index": j, "delta": {"role": "assistant", "content": self.prefix},
                 "logprobs": None, "finish_reason": None} for j in range(self.per_prompt)]

    def chunk_choice(self, d: Delta) -> dict:
        output = self._output(d.index) if self._split else None
        if output is None:
            delta = {"content": d.text} if d.text else {}
        else:
            delta = output.feed(d.text, final=d.finish_reason is not None)
        return {"index": d.index, "delta": delta, "logprobs": self._logprobs(d),
                "finish_reason": self._finish(d.finish_reason, output)}

    def whole_choice(self, index: int, d: Delta) -> dict:
        message: dict = {"role": "assistant", "content": self.prefix + d.text}
        output = None
        if self._split:
            output = self._output(index)
            output.feed(d.text, final=True)
            message = output.message()
            if self.prefix:
                message["content"] = self.prefix + (message["content"] or "")
        return {"index": index, "message": message, "logprobs": self._logprobs(d),
                "finish_reason": self._finish(d.finish_reason, output)}
