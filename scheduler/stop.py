"""Stop rules, checked after each appended output token."""

from __future__ import annotations

from collections.abc import Collection

from pagedserve.scheduler.request import Request, RequestStatus


def check_stop(request: Request, eos_token_ids: Collection[int],
               max_model_len: int) -> RequestStatus | None:
    """The finished status the last output token puts the request in, or None to go on.

    'stop': the last token is EOS (unless ignore_eos) or one of stop_token_ids, counted only once the
    request has at least min_tokens outputs. 'length': max_tokens outputs, or max_model_len tokens
    held. When both apply, 'stop' wins (the model ended on its own). The stopping token stays in the
    outputs; hiding it is the router's business.
    """
    assert request.output_token_ids, "check_stop before any output"
    stop = request.stop
    last = request.output_token_ids[-1]
    is_stop_token = last in stop.stop_token_ids or (not stop.ignore_eos and last in eos_token_ids)
    if is_stop_token and request.num_output_tokens >= stop.min_tokens:
        return RequestStatus.FINISHED_STOPPED
    if request.num_output_tokens >= stop.max_tokens or request.num_tokens >= max_model_len:
        return RequestStatus.FINISHED_LENGTH
    return None
