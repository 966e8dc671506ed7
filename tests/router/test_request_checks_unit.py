"""The OpenAI request bodies' checks (router/openai_protocol.py) called directly, under small
limits: a request exactly at each limit passes, one past it is refused with the message and
`param` the client sees, and omitted sampling fields map to OpenAI's defaults. No server: fast
enough for mutation testing (make mutation-router), which found these cases untested."""

from __future__ import annotations

import pytest

from pagedserve.router.errors import RouterError
from pagedserve.router.generation import GenerationParams
from pagedserve.router.limits import Limits
from pagedserve.router.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    array_bounds,
    check_body_sizes,
    check_list_sizes,
)

LIMITS = Limits(max_n=2, max_stop=2, max_stop_length=3, max_logit_bias=2, max_logprobs=3,
                max_prompts=2, max_sequences=4, max_content_parts=2, max_stop_token_ids=2)
USER = [{"role": "user", "content": "hi"}]


def cmpl(**fields) -> CompletionRequest:
    return CompletionRequest.model_validate({"prompt": "x", **fields})


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": USER, **fields})


def refused(check, message: str, param: str | None) -> None:
    with pytest.raises(RouterError) as e:
        check()
    assert (e.value.status, e.value.message, e.value.param) == (400, message, param)


@pytest.mark.parametrize("at_limit", [
    dict(n=2), dict(stop=["a", "b"]), dict(stop="abc"), dict(stop_token_ids=[1, 2]),
    dict(logit_bias={"1": -100.0, "1234567890": 100.0}), dict(logprobs=3), dict(best_of=2, n=2),
    dict(prompt=["a", "b"], n=2), dict(prompt=[[1], [2]], best_of=2), dict(stream=True, n=2),
    dict(stream=True, stream_options={"include_usage": True}), dict(stream=True, best_of=2, n=2),
])
def test_completions_at_each_limit_pass(at_limit: dict) -> None:
    cmpl(**at_limit).check(LIMITS)


@pytest.mark.parametrize("fields,message,param", [
    (dict(n=3), "n must be at most 2", "n"),
    (dict(stream_options={"include_usage": True}),
     "stream_options is only allowed when stream is true", "stream_options"),
    (dict(stop=["a", "b", "c"]), "at most 2 stop strings", "stop"),
    (dict(stop="abcd"), "stop strings must be at most 3 characters", "stop"),
    (dict(stop_token_ids=[1, 2, 3]), "stop_token_ids may have at most 2 entries, got 3",
     "stop_token_ids"),
    (dict(logit_bias={"1": 0.0, "2": 0.0, "3": 0.0}), "logit_bias may have at most 2 entries",
     "logit_bias"),
    (dict(logit_bias={"12345678901": 1.0}),
     "logit_bias keys must be token ids, got '12345678901'", "logit_bias"),
    (dict(logit_bias={"x" * 40: 1.0}), f"logit_bias keys must be token ids, got {'x' * 32!r}",
     "logit_bias"),
    (dict(logit_bias={"5": 100.5}), "logit_bias values must be in [-100, 100], got 100.5",
     "logit_bias"),
    (dict(logit_bias={"5": -100.5}), "logit_bias values must be in [-100, 100], got -100.5",
     "logit_bias"),
    (dict(suffix="y"), "suffix is not supported (this server does no insertion)", "suffix"),
    (dict(logprobs=4), "logprobs must be at most 3", "logprobs"),
    (dict(best_of=1, n=2), "best_of (1) must be at least n (2)", "best_of"),
    (dict(best_of=3), "best_of must be at most 2", "best_of"),
    (dict(best_of=2, stream=True), "best_of > n cannot be streamed", "best_of"),
    (dict(prompt=""), "prompt must not be empty", "prompt"),
    (dict(prompt=["a", ""]), "prompt must not be empty", "prompt"),
    (dict(prompt=["a", "b", "c"]), "at most 2 prompts in one request", "prompt"),
    (dict(response_format={"type": "json_object"}, min_tokens=1),
     "min_tokens cannot be combined with a structured output constraint (response_format)",
     "min_tokens"),
    (dict(response_format={"type": "json_object"}, ignore_eos=True),
     "ignore_eos cannot be combined with a structured output constraint (response_format)",
     "ignore_eos"),
])
def test_completions_past_a_limit_are_refused(fields: dict, message: str, param: str) -> None:
    refused(lambda: cmpl(**fields).check(LIMITS), message, param)


def test_sequences_are_prompts_times_best_of_or_n() -> None:
    cmpl(prompt=["a", "b"], n=2).check(LIMITS)  # 4 sequences: at the limit
    cmpl(prompt=["a", "b"], n=1, best_of=2).check(LIMITS)
    three = Limits(max_n=2, max_sequences=3)
    for fields in (dict(n=2), dict(best_of=2)):
        refused(lambda: cmpl(prompt=["a", "b"], **fields).check(three),  # noqa: B023
                "prompts x best_of (or n) must be at most 3", "prompt")
    cmpl(prompt=["a", "b", "c"]).check(three)


def test_chat_checks() -> None:
    chat(logprobs=True, top_logprobs=3).check(LIMITS)
    chat(logprobs=True).check(LIMITS)
    refused(lambda: chat(logprobs=True, top_logprobs=4).check(LIMITS),
            "top_logprobs must be at most 3", "top_logprobs")
    refused(lambda: chat(top_logprobs=1).check(LIMITS), "top_logprobs needs logprobs: true",
            "top_logprobs")
    refused(lambda: chat(messages=[]).check(LIMITS), "messages must not be empty", "messages")
    chat(chat_template="{{ 1 }}", chat_template_kwargs={}).check_template(trusted=True)
    for field, value in (("chat_template", "{{ 1 }}"), ("chat_template_kwargs", {})):
        refused(lambda: chat(**{field: value}).check_template(trusted=False),  # noqa: B023
                f"{field} is refused: this server does not trust request chat templates "
                "(--trust-request-chat-template)", field)
    chat(continue_final_message=True, add_generation_prompt=False).check_template(trusted=False)
    refused(lambda: chat(continue_final_message=True).check_template(trusted=False),
            "continue_final_message needs add_generation_prompt false", "continue_final_message")
    parts = chat(messages=[{"role": "user", "content": [{"type": "text", "text": "a"},
                                                        {"type": "text", "text": "b"}]}])
    assert parts.template_messages()[0]["content"] == "a\nb"
    empty = chat(messages=[{"role": "user", "content": [{"type": "text", "text": ""},
                                                        {"type": "text", "text": "b"}]}])
    assert empty.template_messages()[0]["content"] == "\nb"


def test_omitted_sampling_fields_take_openais_defaults() -> None:
    assert cmpl().params(5) == GenerationParams(
        max_tokens=5, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, seed=None,
        presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0, logit_bias={},
        min_tokens=0, stop=(), stop_token_ids=(), ignore_eos=False, skip_special_tokens=True,
        include_stop_str_in_output=False, logprobs=None)
    given = cmpl(temperature=0.0, top_p=0.5, top_k=3, min_p=0.25, seed=-7, presence_penalty=-1.5,
                 frequency_penalty=1.5, repetition_penalty=1.25, logit_bias={"3": -2.0},
                 min_tokens=2, stop="s", stop_token_ids=[4], ignore_eos=True,
                 skip_special_tokens=False, include_stop_str_in_output=True, logprobs=2)
    assert given.params(2) == GenerationParams(
        max_tokens=2, temperature=0.0, top_p=0.5, top_k=3, min_p=0.25, seed=-7,
        presence_penalty=-1.5, frequency_penalty=1.5, repetition_penalty=1.25,
        logit_bias={3: -2.0}, min_tokens=2, stop=("s",), stop_token_ids=(4,), ignore_eos=True,
        skip_special_tokens=False, include_stop_str_in_output=True, logprobs=2)
    refused(lambda: cmpl(min_tokens=3).params(2),
            "min_tokens (3) must be at most max_tokens (2)", "min_tokens")


def test_sizes_are_checked_on_the_parsed_json() -> None:
    assert array_bounds(LIMITS) == {"stop": 2, "stop_token_ids": 2, "messages": 1024,
                                    "tools": 128, "input": 1024}
    check_list_sizes({"stop": 2, "logit_bias": 2}, LIMITS)
    refused(lambda: check_list_sizes({"logit_bias": 3}, LIMITS),
            "logit_bias may have at most 2 entries, got 3", "logit_bias")
    two = [{"type": "text", "text": "a"}] * 2
    check_body_sizes({"messages": [{"role": "user", "content": two}]}, LIMITS)
    refused(lambda: check_body_sizes({"messages": [{"content": "x"}, {"content": [*two, {}]}]},
                                     LIMITS),
            "messages[1].content may have at most 2 parts, got 3", "messages")
    check_body_sizes({"prompt": ["a", "b"]}, LIMITS)
    refused(lambda: check_body_sizes({"prompt": ["a", "b", "c"]}, LIMITS),
            "at most 2 prompts in one request", "prompt")
    refused(lambda: check_body_sizes({"prompt": [[1]] * 3}, LIMITS),
            "at most 2 prompts in one request", "prompt")
    # Token prompts against max_model_len (8): 7 ids leave room for one token, 8 do not.
    check_body_sizes({"prompt": [1] * 7}, LIMITS, max_model_len=8)
    check_body_sizes({"prompt": [[1] * 7, [2]]}, LIMITS, max_model_len=8)
    check_body_sizes({"prompt": [1] * 20}, LIMITS)  # max_model_len unknown
    for prompt in ([1] * 8, [[2], [1] * 8]):
        with pytest.raises(RouterError) as e:
            check_body_sizes({"prompt": prompt}, LIMITS, max_model_len=8)
        assert (e.value.status, e.value.param) == (400, "prompt")
        assert "maximum context length is 8 tokens" in e.value.message
        assert "8 in the prompt, none left for the completion" in e.value.message
