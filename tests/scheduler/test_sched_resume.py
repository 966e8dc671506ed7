"""A request resumed with the outputs its client already has (ScheduleRequest.output_token_ids)
continues as the undisturbed request would: same later tokens under the fake executor's
position-keyed sampling, max_tokens counting the earlier outputs; bad resumptions refused."""

from __future__ import annotations

import pytest

from pagedserve.protos import executor_pb2, scheduler_pb2
from pagedserve.scheduler.config import SchedulerConfig
from pagedserve.scheduler.request_spec import RequestSpec
from tests.scheduler.sched_fakes import make, run

CONFIG = SchedulerConfig(block_size=4, num_kv_blocks=64, max_model_len=128)


def drive(spec: RequestSpec) -> list[int]:
    sched, _ = make()
    sched.add(spec)
    return run(sched).tokens["r"]


def _request(outputs: list[int], max_tokens: int = 12) -> scheduler_pb2.ScheduleRequest:
    return scheduler_pb2.ScheduleRequest(request_id="r", prompt_token_ids=[5, 6, 7, 8, 9],
                                         sampling=executor_pb2.SamplingParams(),
                                         max_tokens=max_tokens, ignore_eos=True,
                                         output_token_ids=outputs)


def test_a_resumed_request_continues_the_undisturbed_one() -> None:
    whole = drive(RequestSpec.from_proto(CONFIG, _request([])))
    assert len(whole) == 12
    resumed = drive(RequestSpec.from_proto(CONFIG, _request(whole[:5])))
    assert resumed == whole[5:]  # 7 more: max_tokens counts the 5 it already had


@pytest.mark.parametrize(("outputs", "max_tokens", "message"), [
    ([1] * 12, 12, "max_tokens 12 leaves none"),
    ([1] * 123, 200, "no room in max_model_len"),  # 5 + 123 = max_model_len
    ([-1], 12, "output_token_ids must hold"),
])
def test_a_resumption_with_nothing_left_is_refused(outputs, max_tokens, message) -> None:
    with pytest.raises(ValueError, match=message):
        RequestSpec.from_proto(CONFIG, _request(outputs, max_tokens))

