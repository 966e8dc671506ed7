"""Checks on a new request, each failure a ValueError naming the field."""

from __future__ import annotations

from collections.abc import Sequence

from pagedserve.protos import executor_pb2
from pagedserve.protos.request_checks import check_sampling_params, check_token_ids
from pagedserve.scheduler.config import SchedulerConfig


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_token_ids(name: str, token_ids: Sequence[int]) -> None:
    for t in token_ids:
        if not _is_int(t) or not 0 <= t < 2**31:
            raise ValueError(f"{name} must hold non-negative int32 token ids, got {t!r}")


def validate_request(config: SchedulerConfig, request_id: str, prompt_token_ids: Sequence[int], *,
                     max_tokens: int, min_tokens: int, stop_token_ids: Sequence[int], n: int,
                     output_token_ids: Sequence[int] = (),
                     sampling: executor_pb2.SamplingParams | None = None) -> None:
    """Raises ValueError naming the first bad field (RequestSpec.create is the one caller). With
    the model's vocabulary known, also everything the executor checks on every plan
    (protos/request_checks.py): a request it would refuse must be refused here, alone, not make
    every plan that carries it fail."""
    if not isinstance(request_id, str) or not request_id:
        raise ValueError(f"request_id must be a non-empty string, got {request_id!r}")
    if len(prompt_token_ids) == 0:
        raise ValueError("prompt_token_ids must not be empty")
    if len(prompt_token_ids) > config.max_model_len:
        raise ValueError(f"prompt_token_ids has {len(prompt_token_ids)} tokens, more than "
                         f"max_model_len={config.max_model_len}")
    _check_token_ids("prompt_token_ids", prompt_token_ids)
    _check_token_ids("stop_token_ids", stop_token_ids)
    if not _is_int(max_tokens) or max_tokens < 1:
        raise ValueError(f"max_tokens must be an int >= 1, got {max_tokens!r}")
    if not _is_int(min_tokens) or not 0 <= min_tokens <= max_tokens:
        raise ValueError(f"min_tokens must be an int in [0, max_tokens], got {min_tokens!r}")
    if not _is_int(n) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    _check_resumed(config, prompt_token_ids, output_token_ids, max_tokens, n)
    if config.vocab_size > 0:
        _check_vocabulary(config.vocab_size, request_id, prompt_token_ids, output_token_ids,
                          stop_token_ids, sampling or executor_pb2.SamplingParams())


def _check_vocabulary(vocab_size: int, request_id: str, prompt_token_ids: Sequence[int],
                      output_token_ids: Sequence[int], stop_token_ids: Sequence[int],
                      sampling: executor_pb2.SamplingParams) -> None:
    for field, ids in (("prompt_token_ids", prompt_token_ids),
                       ("output_token_ids", output_token_ids),
                       ("stop_token_ids", stop_token_ids)):
        check_token_ids(request_id, field, ids, vocab_size)
    # the stop rules in `sampling` are the scheduler's to write (from the fields checked above)
    view = executor_pb2.SamplingParams()
    view.CopyFrom(sampling)
    view.ClearField("stop_token_ids")
    view.min_tokens = 0
    check_sampling_params(request_id, view, vocab_size)
    if view.HasField("structured") and not view.structured.grammar:
        raise ValueError(f"request {request_id!r}: sampling.structured.grammar is empty")


def _check_resumed(config: SchedulerConfig, prompt_token_ids: Sequence[int],
                   output_token_ids: Sequence[int], max_tokens: int, n: int) -> None:
    """A resumed request must have something left to generate, alone."""
    if not output_token_ids:
        return
    _check_token_ids("output_token_ids", output_token_ids)
    if len(output_token_ids) >= max_tokens:
        raise ValueError(f"output_token_ids holds {len(output_token_ids)} tokens: max_tokens "
                         f"{max_tokens} leaves none to generate")
    if len(prompt_token_ids) + len(output_token_ids) >= config.max_model_len:
        raise ValueError("output_token_ids: prompt and outputs leave no room in max_model_len="
                         f"{config.max_model_len}")
    if n != 1:
        raise ValueError("output_token_ids: a resumed request must have n = 1")
