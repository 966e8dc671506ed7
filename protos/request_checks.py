"""What a request must satisfy before any step is planned for it: one wire rule, applied where a
request enters the scheduler (so a bad one is refused alone, with INVALID_ARGUMENT) and again by
the executor on every plan (a plan it cannot run is refused whole, so nothing reaches the model
half-checked). Each failure is a ValueError naming the request and the field."""

from __future__ import annotations

import math
from collections.abc import Iterable

from pagedserve.protos import executor_pb2

# gRPC trailing metadata of an Execute stream the executor ended over one request: its id (bytes)
REFUSED_REQUEST_KEY = "pagedserve-refused-request-bin"


class RequestRefused(ValueError):
    """A check failed for one request. The executor ends the plan's stream naming it
    (REFUSED_REQUEST_KEY), so the scheduler fails that request alone instead of resending it, and
    every plan that carries it, for ever."""

    def __init__(self, request_id: str, message: str) -> None:
        super().__init__(message)
        self.request_id = request_id


def check_token_ids(request_id: str, field: str, token_ids: Iterable[int],
                    vocab_size: int) -> None:
    if any(not 0 <= t < vocab_size for t in token_ids):
        raise RequestRefused(request_id, f"request {request_id!r}: {field} holds an id outside "
                                         f"[0, {vocab_size})")


def check_sampling_params(request_id: str, p: executor_pb2.SamplingParams,
                          vocab_size: int) -> None:
    """Parameters the sampler cannot honour."""

    def bad(field: str, why: str) -> ValueError:
        return RequestRefused(request_id, f"request {request_id!r}: sampling.{field} {why}")

    checks = [
        ("temperature", math.isfinite(p.temperature) and p.temperature >= 0, "must be >= 0"),
        ("top_p", 0 <= p.top_p <= 1, "must be in [0, 1] (0 reads as 1)"),
        ("top_k", p.top_k >= -1, "must be -1, 0 (disabled) or positive"),
        ("min_p", 0 <= p.min_p <= 1, "must be in [0, 1]"),
        ("repetition_penalty", math.isfinite(p.repetition_penalty) and p.repetition_penalty >= 0,
         "must be > 0 (0 reads as 1)"),
        ("presence_penalty", math.isfinite(p.presence_penalty), "must be finite"),
        ("frequency_penalty", math.isfinite(p.frequency_penalty), "must be finite"),
        ("min_tokens", p.min_tokens >= 0, "must be >= 0"),
        ("logprobs", not p.HasField("logprobs") or 0 <= p.logprobs <= vocab_size,
         f"must be in [0, {vocab_size}]"),
        ("logit_bias", all(0 <= t < vocab_size for t in p.logit_bias),
         f"ids must be in [0, {vocab_size})"),
        ("logit_bias", all(not math.isnan(v) for v in p.logit_bias.values()),
         "values must not be NaN"),
        ("stop_token_ids", all(0 <= t < vocab_size for t in p.stop_token_ids),
         f"must be in [0, {vocab_size})"),
    ]
    for field, ok, why in checks:
        if not ok:
            raise bad(field, why)
