"""A new request's checks at admission (scheduler/validation.py) and the gRPC status each refusal
ends its call with (scheduler/admission.py), called directly: the rules as the field comments and
docstrings state them, each refusal naming its field (found missing by mutation testing)."""

from __future__ import annotations

import asyncio
import re

import grpc
import pytest

from pagedserve.protos import executor_pb2, scheduler_pb2
from pagedserve.protos.request_checks import RequestRefused
from pagedserve.scheduler.admission import admit
from pagedserve.scheduler.config import SchedulerConfig
from pagedserve.scheduler.validation import validate_request

V = 50  # the model's vocabulary, when the scheduler knows it
CFG = SchedulerConfig(block_size=4, num_kv_blocks=8, max_model_len=16)
CFG_V = SchedulerConfig(block_size=4, num_kv_blocks=8, max_model_len=16, vocab_size=V)


def check(cfg: SchedulerConfig = CFG, request_id: object = "r", prompt=(1, 2, 3), *,
          max_tokens: object = 4, min_tokens: object = 0, stop=(), n: object = 1, outputs=(),
          sampling: executor_pb2.SamplingParams | None = None) -> None:
    validate_request(cfg, request_id, prompt, max_tokens=max_tokens, min_tokens=min_tokens,  # type: ignore[arg-type]
                     stop_token_ids=stop, n=n, output_token_ids=outputs, sampling=sampling)


def test_requests_at_the_edges_of_each_rule_pass() -> None:
    check(prompt=[0] * 16)  # max_model_len tokens
    check(prompt=[0, 2**31 - 1], stop=[0, 2**31 - 1])  # int32 ids, no vocabulary known
    check(max_tokens=1, min_tokens=1)
    check(max_tokens=5, min_tokens=5, n=3)
    check(prompt=[1] * 10, outputs=[2] * 5, max_tokens=6)  # 15 of 16 tokens, one output left
    check(CFG_V, prompt=[0, V - 1], outputs=[V - 1], stop=[0, V - 1], max_tokens=3)
    check(CFG_V, sampling=None)
    check(CFG_V, sampling=executor_pb2.SamplingParams(
        temperature=0.5, top_p=1.0, top_k=V, logprobs=V, logit_bias={V - 1: 2.0},
        structured=executor_pb2.StructuredOutput(grammar="start: \"a\"")))
    # The stop rules in `sampling` are the scheduler's to write from the checked fields: a caller's
    # values there are not read.
    check(CFG_V, sampling=executor_pb2.SamplingParams(stop_token_ids=[V, -1], min_tokens=-3))


@pytest.mark.parametrize("kwargs,message", [
    (dict(request_id=""), "request_id must be a non-empty string, got ''"),
    (dict(request_id=7), "request_id must be a non-empty string, got 7"),
    (dict(prompt=[]), "prompt_token_ids must not be empty"),
    (dict(prompt=[0] * 17), "prompt_token_ids has 17 tokens, more than max_model_len=16"),
    (dict(prompt=[1, -1]), "prompt_token_ids must hold non-negative int32 token ids, got -1"),
    (dict(prompt=[2**31]), "prompt_token_ids must hold non-negative int32 token ids, got 2147483648"),
    (dict(prompt=[True]), "prompt_token_ids must hold non-negative int32 token ids, got True"),
    (dict(prompt=[1.0]), "prompt_token_ids must hold non-negative int32 token ids, got 1.0"),
    (dict(stop=[3, 2**31]), "stop_token_ids must hold non-negative int32 token ids, got 2147483648"),
    (dict(max_tokens=0), "max_tokens must be an int >= 1, got 0"),
    (dict(max_tokens=True), "max_tokens must be an int >= 1, got True"),
    (dict(max_tokens=2.0), "max_tokens must be an int >= 1, got 2.0"),
    (dict(min_tokens=-1), "min_tokens must be an int in [0, max_tokens], got -1"),
    (dict(min_tokens=5), "min_tokens must be an int in [0, max_tokens], got 5"),
    (dict(min_tokens=False), "min_tokens must be an int in [0, max_tokens], got False"),
    (dict(n=0), "n must be an int >= 1, got 0"),
    (dict(n=True), "n must be an int >= 1, got True"),
    (dict(outputs=[4, -2]), "output_token_ids must hold non-negative int32 token ids, got -2"),
    (dict(outputs=[4] * 4), "output_token_ids holds 4 tokens: max_tokens 4 leaves none to generate"),
    (dict(prompt=[1] * 10, outputs=[2] * 6, max_tokens=8),
     "output_token_ids: prompt and outputs leave no room in max_model_len=16"),
    (dict(outputs=[4], n=2), "output_token_ids: a resumed request must have n = 1"),
])
def test_each_bad_field_is_refused_by_name(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        check(**kwargs)


@pytest.mark.parametrize("kwargs,message", [
    (dict(prompt=[1, V]), "request 'r': prompt_token_ids holds an id outside [0, 50)"),
    (dict(outputs=[V], max_tokens=3), "request 'r': output_token_ids holds an id outside [0, 50)"),
    (dict(stop=[V + 7]), "request 'r': stop_token_ids holds an id outside [0, 50)"),
    (dict(sampling=executor_pb2.SamplingParams(top_p=2.0)),
     "request 'r': sampling.top_p must be in [0, 1] (0 reads as 1)"),
    (dict(sampling=executor_pb2.SamplingParams(logit_bias={V: 1.0})),
     "request 'r': sampling.logit_bias ids must be in [0, 50)"),
    (dict(sampling=executor_pb2.SamplingParams(structured=executor_pb2.StructuredOutput())),
     "request 'r': sampling.structured.grammar is empty"),
])
def test_ids_and_sampling_are_checked_against_a_known_vocabulary(kwargs: dict, message: str
                                                                  ) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$") as refused:
        check(CFG_V, **kwargs)
    if isinstance(refused.value, RequestRefused):
        assert refused.value.request_id == "r"
    # Without a vocabulary (vocab_size 0) only the int32 range is checked.
    if "sampling" not in kwargs:
        check(CFG, **kwargs)


def test_the_vocabulary_check_keeps_the_callers_sampling_params() -> None:
    sampling = executor_pb2.SamplingParams(stop_token_ids=[V], min_tokens=2, top_k=3)
    check(CFG_V, sampling=sampling)
    assert list(sampling.stop_token_ids) == [V] and sampling.min_tokens == 2


# ---- admission: the status a refused request's call ends with ------------------------------------


class FakeLoop:
    """What admit() uses of a StepLoop: `ready` (an executor is connected) and submit()."""

    def __init__(self, ready: bool = True, error: Exception | None = None) -> None:
        self.ready = asyncio.Event()
        if ready:
            self.ready.set()
        self.error = error
        self.submitted: list[tuple[object, object]] = []

    def submit(self, request: object, sink: object) -> None:
        if self.error is not None:
            raise self.error
        self.submitted.append((request, sink))


REQ = scheduler_pb2.ScheduleRequest(request_id="r1", prompt_token_ids=[1], max_tokens=2)


def run_admit(loop: FakeLoop, *, accepting: bool = True, timeout: float | None = 5.0):
    async def go():
        return await admit(loop, REQ, sink, accepting=accepting, timeout=timeout)  # type: ignore[arg-type]

    sink = object()
    return asyncio.run(go()), sink


def test_admit_submits_the_request_with_its_sink() -> None:
    loop = FakeLoop()
    status, sink = run_admit(loop)
    assert status is None
    assert loop.submitted == [(REQ, sink)]


def test_admit_waits_for_an_executor() -> None:
    loop = FakeLoop(ready=False)

    async def go():
        sink = object()
        task = asyncio.ensure_future(admit(loop, REQ, sink, accepting=True, timeout=None))  # type: ignore[arg-type]
        await asyncio.sleep(0.05)
        assert not task.done() and not loop.submitted
        loop.ready.set()
        assert await asyncio.wait_for(task, 5) is None
        assert loop.submitted == [(REQ, sink)]

    asyncio.run(go())


def test_admit_refusals_name_their_cause() -> None:
    shutting = FakeLoop()
    assert run_admit(shutting, accepting=False)[0] == (grpc.StatusCode.UNAVAILABLE,
                                                       "the scheduler is shutting down")
    assert not shutting.submitted
    assert run_admit(FakeLoop(ready=False), timeout=0.01)[0] == (
        grpc.StatusCode.UNAVAILABLE, "no executor has connected yet")
    assert run_admit(FakeLoop(error=KeyError("r1")))[0] == (
        grpc.StatusCode.ALREADY_EXISTS, "request_id 'r1' is already running")
    assert run_admit(FakeLoop(error=ValueError("max_tokens must be an int >= 1, got 0")))[0] == (
        grpc.StatusCode.INVALID_ARGUMENT, "max_tokens must be an int >= 1, got 0")


def test_a_vocabulary_of_one_token_is_still_checked() -> None:
    one = SchedulerConfig(block_size=4, num_kv_blocks=8, max_model_len=16, vocab_size=1)
    check(one, prompt=[0, 0])
    with pytest.raises(ValueError, match=re.escape("prompt_token_ids holds an id outside [0, 1)")):
        check(one, prompt=[0, 1])
