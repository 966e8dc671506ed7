"""RequestOutputDelta -> TokenOutput, the wire form both Generate and Session send."""

from __future__ import annotations

import grpc

from pagedserve.protos import scheduler_pb2
from pagedserve.scheduler.outputs import RequestOutputDelta


def append_delta(out: scheduler_pb2.TokenOutput, delta: RequestOutputDelta) -> None:
    """Adds one step's delta to `out` (several deltas of one request can share a message)."""
    out.token_ids.extend(delta.new_token_ids)
    out.logprobs.extend(delta.new_logprobs or ())
    out.top_logprobs.extend(delta.new_top_logprobs or ())
    out.num_prompt_tokens = max(out.num_prompt_tokens, delta.num_prompt_tokens)
    out.num_cached_tokens = max(out.num_cached_tokens, delta.num_cached_tokens)
    if delta.finished:
        out.finished, out.finish_reason = True, delta.finish_reason or ""


def error_output(request_id: str, code: grpc.StatusCode, message: str
                 ) -> scheduler_pb2.TokenOutput:
    """A Session request's last output when it fails as a Generate call would end."""
    return scheduler_pb2.TokenOutput(request_id=request_id, finished=True,
                                     error_code=code.value[0], error_message=message)
