"""A new request as the scheduler takes it: checked once, each fact in one form.

The stop rules (max_tokens, min_tokens, stop_token_ids, ignore_eos) are owned by StopParams, from
ScheduleRequest's own fields; the copies SamplingParams also has are not read on that hop (the
scheduler writes them into the executor's SamplingParams, where the sampler masks stop tokens under
min_tokens). max_tokens 0 means what the context leaves. The caller's messages are never edited.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pagedserve.protos import executor_pb2, scheduler_pb2
from pagedserve.scheduler.config import SchedulerConfig
from pagedserve.scheduler.request import StopParams
from pagedserve.scheduler.validation import validate_request


@dataclass(frozen=True)
class RequestSpec:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: executor_pb2.SamplingParams  # the caller's; its stop-rule fields are not read
    stop: StopParams
    cache_salt: str = ""
    n: int = 1
    output_token_ids: tuple[int, ...] = ()  # a resumed request's outputs so far

    @classmethod
    def create(cls, config: SchedulerConfig, request_id: str, prompt_token_ids: Sequence[int],
               sampling: executor_pb2.SamplingParams, *, max_tokens: int, min_tokens: int = 0,
               stop_token_ids: Sequence[int] = (), ignore_eos: bool = False,
               cache_salt: str = "", n: int = 1,
               output_token_ids: Sequence[int] = ()) -> RequestSpec:
        """Checks the request (ValueError naming the field) and resolves max_tokens 0."""
        if max_tokens == 0:
            max_tokens = max(1, config.max_model_len - len(prompt_token_ids))
        validate_request(config, request_id, prompt_token_ids, max_tokens=max_tokens,
                         min_tokens=min_tokens, stop_token_ids=stop_token_ids, n=n,
                         output_token_ids=output_token_ids, sampling=sampling)
        if sampling.HasField("structured") and (min_tokens > 0 or ignore_eos):
            # the grammar needs EOS wherever it ends; both would take it away
            raise ValueError("sampling.structured cannot be combined with min_tokens or "
                             "ignore_eos")
        stop = StopParams(max_tokens, min_tokens, frozenset(stop_token_ids), ignore_eos)
        return cls(request_id, tuple(prompt_token_ids), sampling, stop, cache_salt, n,
                   tuple(output_token_ids))

    @classmethod
    def from_proto(cls, config: SchedulerConfig, req: scheduler_pb2.ScheduleRequest) -> RequestSpec:
        return cls.create(config, req.request_id, req.prompt_token_ids, req.sampling,
                          max_tokens=req.max_tokens, min_tokens=req.min_tokens,
                          stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos,
                          cache_salt=req.cache_salt, output_token_ids=req.output_token_ids)
