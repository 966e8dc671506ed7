"""One request's generation: scheduler token stream in, final text deltas out.

For each TokenOutput the scheduler sends, every token goes through the incremental detokenizer and
then the stop-string matcher; what comes out is text no later token can change. A stop string ends
the stream early (closing it cancels the scheduler call, which aborts the request). The token that
ended generation by EOS or a stop token id counts as a completion token but shows no text.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Collection, Mapping
from dataclasses import dataclass, field, replace

import grpc

from pagedserve.protos import executor_pb2, scheduler_pb2
from pagedserve.protos.choice_seed import choice_seed
from pagedserve.router.detokenizer import IncrementalDetokenizer
from pagedserve.router.errors import RouterError, from_grpc
from pagedserve.router.resume import resumable_outputs
from pagedserve.router.scheduler_client import SchedulerClient
from pagedserve.router.stop_strings import StopStringMatcher
from pagedserve.router.tokenizer import Tokenizer


@dataclass(frozen=True)
class GenerationParams:
    """What one generation asks for; validated by the caller (HTTP or gRPC front)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # when set: the sampled token's logprob and this many top ones
    structured: str | None = None  # a checked constraint's grammar (router/structured_outputs.py)

    def for_choice(self, index: int) -> GenerationParams:
        """Choice `index` of n: its seed as protos/choice_seed.py says, so choices differ."""
        return self if self.seed is None else replace(self, seed=choice_seed(self.seed, index))

    def schedule_request(self, request_id: str, prompt_ids: list[int]
                         ) -> scheduler_pb2.ScheduleRequest:
        sampling = executor_pb2.SamplingParams(
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty, logit_bias=dict(self.logit_bias),
        )  # the stop rules travel once, in ScheduleRequest's own fields
        if self.seed is not None:
            sampling.seed = choice_seed(self.seed, 0)  # negative seeds are as good as any
        if self.logprobs is not None:
            sampling.logprobs = self.logprobs
        if self.structured is not None:
            sampling.structured.grammar = self.structured
        return scheduler_pb2.ScheduleRequest(
            request_id=request_id, prompt_token_ids=prompt_ids, sampling=sampling,
            max_tokens=self.max_tokens, min_tokens=self.min_tokens,
            stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
        )


@dataclass(frozen=True)
class ChoiceSpec:
    """One sequence to generate: the choice index it answers as, its prompt and its params."""

    index: int
    prompt_ids: list[int]
    params: GenerationParams


TopLogprobs = list[tuple[int, float]]  # (token id, logprob), most likely first


@dataclass
class Delta:
    """New final text and tokens of one choice; finish_reason set on its last delta.

    logprobs and top_logprobs (when asked) are one entry per token in token_ids."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int  # so far, this choice
    cached_tokens: int = 0
    logprobs: list[float] | None = None
    top_logprobs: list[TopLogprobs] | None = None


class _Choice:
    """Detokenizer and stop-string state of one choice."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], params: GenerationParams,
                 eos_ids: Collection[int]) -> None:
        self.params = params
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids, params.skip_special_tokens)
        self.stops = StopStringMatcher(params.stop, params.include_stop_str_in_output)
        hidden = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids))
        self.hidden_stop_ids = set() if params.include_stop_str_in_output else hidden

    def step(self, ids: list[int], finish_reason: str | None) -> tuple[str, int, bool]:
        """Text from these tokens, how many tokens counted, whether a stop string ended it."""
        text_ids = ids
        if finish_reason == "stop" and ids and ids[-1] in self.hidden_stop_ids:
            text_ids = ids[:-1]
        pieces = []
        for used, token_id in enumerate(text_ids, 1):
            emitted, stopped = self.stops.feed(self.detok.push(token_id))
            pieces.append(emitted)
            if stopped:
                return "".join(pieces), used, True
        if finish_reason is not None:
            emitted, stopped = self.stops.feed(self.detok.flush())
            pieces.append(emitted)
            if not stopped:
                pieces.append(self.stops.flush())
            return "".join(pieces), len(ids), stopped
        return "".join(pieces), len(ids), False


async def generate(client: SchedulerClient, tokenizer: Tokenizer, request_id: str,
                   prompt_ids: list[int], params: GenerationParams, eos_ids: Collection[int],
                   index: int = 0, resume_timeout_s: float = 0.0,
                   traceparent: str = "") -> AsyncIterator[Delta]:
    """Deltas of one choice; the last has finish_reason. Closing early aborts the request. With
    resume_timeout_s > 0 it survives a scheduler restart (router/resume.py)."""
    choice = _Choice(tokenizer, prompt_ids, params, eos_ids)
    request = params.schedule_request(request_id, prompt_ids)
    request.traceparent = traceparent
    stream = resumable_outputs(client, request, resume_timeout_s)
    n_out = 0
    try:
        async for out in stream:
            reason = (out.finish_reason or "stop") if out.finished else None
            ids = list(out.token_ids)
            text, used, stopped = choice.step(ids, reason)
            n_out += used
            if stopped:
                reason = "stop"
            yield Delta(index, text, ids[:used], reason, len(prompt_ids), n_out,
                        out.num_cached_tokens, *_logprobs_of(out, used, params.logprobs))
            if reason is not None:
                return
        raise RouterError(f"scheduler stream for {request_id} ended unfinished", 502,
                          "internal_error")
    except grpc.aio.AioRpcError as e:
        raise from_grpc(e) from e
    finally:
        await stream.aclose()


def _logprobs_of(out: scheduler_pb2.TokenOutput, used: int, asked: int | None
                 ) -> tuple[list[float] | None, list[TopLogprobs] | None]:
    """The first `used` tokens' logprobs and top logprobs, when the request asked for them."""
    if asked is None:
        return None, None
    logprobs = list(out.logprobs[:used])
    if len(logprobs) != used:
        raise RouterError(f"the scheduler sent {len(logprobs)} logprobs for {used} tokens", 502,
                          "internal_error")
    tops = [list(zip(t.token_ids, t.logprobs)) for t in out.top_logprobs[:used]]
    tops += [[] for _ in range(used - len(tops))]  # logprobs=0: no top entries at all
    return logprobs, tops


async def merge(streams: list[AsyncIterator[Delta]]) -> AsyncIterator[Delta]:
    """Interleave the choices' deltas as they come; closing the merge closes every stream."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as stream:
            async for delta in stream:
                yield delta
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(stream: AsyncIterator[Delta]) -> None:
        try:
            async for delta in stream:
                await queue.put(delta)
            await queue.put(done)
        except Exception as e:
            await queue.put(e)
        finally:
            await stream.aclose()

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
