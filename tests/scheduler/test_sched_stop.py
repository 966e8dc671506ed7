"""Stop rules: EOS, stop token ids, min_tokens, ignore_eos, max_tokens, max_model_len."""

from pagedserve.protos import executor_pb2
from pagedserve.scheduler.config import SchedulerConfig
from tests.scheduler.sched_fakes import GREEDY, DrivenScheduler, FakeExecutor, run

EOS = 2


def finish(script: list[int], max_model_len: int = 64, prompt_len: int = 3,
           **kwargs: object) -> tuple[list[int], str | None]:
    fake = FakeExecutor(block_size=4, num_blocks=32, max_model_len=max_model_len,
                        eos_token_ids=(EOS,), scripts={"r": script})
    cfg = SchedulerConfig(block_size=4, num_kv_blocks=32, max_model_len=max_model_len,
                          eos_token_ids=(EOS,))
    sched = DrivenScheduler(cfg, fake)
    kwargs.setdefault("max_tokens", 10)
    sched.add_request("r", [7] * prompt_len, GREEDY, **kwargs)  # type: ignore[arg-type]
    out = run(sched)
    return out.tokens["r"], out.reasons["r"]


def test_eos_stops_and_is_kept_in_the_outputs() -> None:
    assert finish([5, 6, EOS, 9]) == ([5, 6, EOS], "stop")


def test_stop_token_ids() -> None:
    assert finish([5, 6, 9, 11], stop_token_ids=[9]) == ([5, 6, 9], "stop")


def test_min_tokens_delays_eos_and_stop_ids() -> None:
    tokens, reason = finish([EOS, 9, EOS, 5, 5], min_tokens=3, stop_token_ids=[9])
    assert (tokens, reason) == ([EOS, 9, EOS], "stop")  # the third output may stop
    assert finish([EOS, 9, 5, 5], min_tokens=2, stop_token_ids=[9]) == ([EOS, 9], "stop")


def test_ignore_eos_keeps_stop_ids() -> None:
    assert finish([EOS, EOS, 8], max_tokens=3, ignore_eos=True) == ([EOS, EOS, 8], "length")
    assert finish([EOS, 9, 8], ignore_eos=True, stop_token_ids=[9]) == ([EOS, 9], "stop")


def test_max_tokens() -> None:
    tokens, reason = finish([5] * 20, max_tokens=4)
    assert (tokens, reason) == ([5, 5, 5, 5], "length")


def test_stop_wins_over_length_on_the_same_token() -> None:
    assert finish([5, EOS], max_tokens=2) == ([5, EOS], "stop")


def test_max_model_len() -> None:
    tokens, reason = finish([5] * 20, max_model_len=12, prompt_len=8, max_tokens=100)
    assert (len(tokens), reason) == (4, "length")
    # a prompt of exactly max_model_len still gets one token
    tokens, reason = finish([5] * 20, max_model_len=12, prompt_len=12, max_tokens=100)
    assert (len(tokens), reason) == (1, "length")


def test_the_executor_gets_the_stop_rules_in_sampling() -> None:
    fake = FakeExecutor(block_size=4, num_blocks=32, max_model_len=64)
    sched = DrivenScheduler(SchedulerConfig(block_size=4, num_kv_blocks=32, max_model_len=64), fake)
    sched.add_request("r", [7, 7], GREEDY, max_tokens=5, min_tokens=2, stop_token_ids=[9, 4],
                      ignore_eos=True)
    sched.step()
    sent = fake.state["r"].sampling
    assert (sent.min_tokens, sorted(sent.stop_token_ids), sent.ignore_eos) == (2, [4, 9], True)
    assert GREEDY.min_tokens == 0 and not GREEDY.stop_token_ids  # the caller's copy is untouched


def test_the_stop_rules_have_one_owner_and_sampling_copies_are_not_read() -> None:
    """ScheduleRequest's own fields own the stop rules; whatever the caller's SamplingParams says
    of them is overwritten in the executor's copy, and the caller's message is not edited."""
    fake = FakeExecutor(block_size=4, num_blocks=32, max_model_len=64)
    sched = DrivenScheduler(SchedulerConfig(block_size=4, num_kv_blocks=32, max_model_len=64), fake)
    contrary = executor_pb2.SamplingParams(min_tokens=4, stop_token_ids=[8], ignore_eos=True)
    sched.add_request("r", [7], contrary, max_tokens=5, min_tokens=1, stop_token_ids=[5])
    sched.step()
    sent = fake.state["r"].sampling
    assert (sent.min_tokens, list(sent.stop_token_ids), sent.ignore_eos) == (1, [5], False)
    assert (contrary.min_tokens, list(contrary.stop_token_ids)) == (4, [8])


def test_max_tokens_zero_is_what_the_context_leaves() -> None:
    from pagedserve.protos import scheduler_pb2
    from pagedserve.scheduler.request_spec import RequestSpec

    cfg = SchedulerConfig(block_size=4, num_kv_blocks=32, max_model_len=64)
    req = scheduler_pb2.ScheduleRequest(request_id="r", prompt_token_ids=[7] * 10, max_tokens=0)
    assert RequestSpec.from_proto(cfg, req).stop.max_tokens == 54
    assert req.max_tokens == 0  # the caller's message is not edited
