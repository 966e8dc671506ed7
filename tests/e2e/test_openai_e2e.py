"""End to end: one real `pagedserve serve` (executor, scheduler, router processes), driven through
the official `openai` client and the public gRPC API, checked against transformers on the same
weights.

Killing the executor mid-generation and SIGTERM's clean exit of a busy server are covered in
tests/services (test_executor_restart.py, test_serve.py); the `serve` fixture here checks the
clean exit once more at teardown.
"""

from __future__ import annotations

import time

import grpc
import openai
import pytest

from pagedserve.protos import generation_pb2, generation_pb2_grpc
from tests.e2e.conftest import HF, Reference, Serve, metrics

pytestmark = pytest.mark.timeout(120)  # the first test also starts serve and loads transformers

MAX_TOKENS = 24
PROMPTS = ["The quick brown fox", "def main():", "Hello, world! Once upon a time",
           "import numpy as np\n"]
MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hello there, how are you?"}]
GREEDY = {"temperature": 0, "max_tokens": MAX_TOKENS, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def client(serve: Serve) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{serve.base_url}/v1", api_key="x", max_retries=0,
                         timeout=30)


@pytest.fixture(scope="module")
def stub(serve: Serve) -> generation_pb2_grpc.GenerationStub:
    with grpc.insecure_channel(serve.grpc_address) as channel:
        yield generation_pb2_grpc.GenerationStub(channel)


def streamed(stream) -> tuple[dict[int, list[str]], dict[int, str | None], object]:
    """Text deltas and finish reason per choice index, and the usage chunk's usage (or None)."""
    deltas: dict[int, list[str]] = {}
    finish: dict[int, str | None] = {}
    usage = None
    with stream:
        for chunk in stream:
            if chunk.usage is not None:
                assert not chunk.choices and usage is None
                usage = chunk.usage
            for c in chunk.choices:
                text = c.text if hasattr(c, "text") else c.delta.content
                deltas.setdefault(c.index, [])
                if text:
                    deltas[c.index].append(text)
                if c.finish_reason is not None:
                    assert finish.get(c.index) is None, "two finish reasons for one choice"
                finish[c.index] = c.finish_reason
    return deltas, finish, usage


def check_usage(usage, prompt_tokens: int, completion_tokens: int) -> None:
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) \
        == (prompt_tokens, completion_tokens, prompt_tokens + completion_tokens)


# --- greedy text equals transformers' -------------------------------------------------------------


@pytest.mark.parametrize("prompt", PROMPTS)
def test_completion_greedy_matches_transformers(client: openai.OpenAI, hf: HF,
                                                prompt: str) -> None:
    ref = hf.greedy(prompt, MAX_TOKENS)
    out = client.completions.create(model="", prompt=prompt, **GREEDY)
    assert [c.index for c in out.choices] == [0]
    assert out.choices[0].text == ref.text
    assert out.choices[0].finish_reason == "length"
    check_usage(out.usage, len(ref.prompt_ids), MAX_TOKENS)

    deltas, finish, usage = streamed(client.completions.create(
        model="", prompt=prompt, stream=True, stream_options={"include_usage": True}, **GREEDY))
    assert "".join(deltas[0]) == ref.text and finish == {0: "length"}
    check_usage(usage, len(ref.prompt_ids), MAX_TOKENS)


def test_chat_greedy_matches_transformers(client: openai.OpenAI, hf: HF) -> None:
    ref = hf.greedy_ids(hf.chat_ids(MESSAGES), MAX_TOKENS)
    out = client.chat.completions.create(model="", messages=MESSAGES, **GREEDY)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == ref.text
    assert out.choices[0].finish_reason == "length"
    check_usage(out.usage, len(ref.prompt_ids), MAX_TOKENS)

    stream = client.chat.completions.create(model="", messages=MESSAGES, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY)
    deltas, finish, usage = streamed(stream)
    assert "".join(deltas[0]) == ref.text and finish == {0: "length"}
    check_usage(usage, len(ref.prompt_ids), MAX_TOKENS)


def test_streaming_without_include_usage_sends_no_usage(client: openai.OpenAI, hf: HF) -> None:
    ref = hf.greedy(PROMPTS[0], MAX_TOKENS)
    deltas, finish, usage = streamed(client.completions.create(
        model="", prompt=PROMPTS[0], stream=True, **GREEDY))
    assert "".join(deltas[0]) == ref.text and finish == {0: "length"} and usage is None


# --- n=2 ------------------------------------------------------------------------------------------


def test_n2_completion(client: openai.OpenAI, hf: HF) -> None:
    """Two greedy choices are both transformers' text; usage counts the tokens of both."""
    ref = hf.greedy(PROMPTS[1], MAX_TOKENS)
    out = client.completions.create(model="", prompt=PROMPTS[1], n=2, **GREEDY)
    assert sorted(c.index for c in out.choices) == [0, 1]
    assert [c.text for c in out.choices] == [ref.text, ref.text]
    check_usage(out.usage, len(ref.prompt_ids), 2 * MAX_TOKENS)

    deltas, finish, usage = streamed(client.completions.create(
        model="", prompt=PROMPTS[1], n=2, stream=True, stream_options={"include_usage": True},
        **GREEDY))
    assert {i: "".join(d) for i, d in deltas.items()} == {0: ref.text, 1: ref.text}
    assert finish == {0: "length", 1: "length"}
    check_usage(usage, len(ref.prompt_ids), 2 * MAX_TOKENS)


def test_n2_chat_sampled(client: openai.OpenAI, hf: HF) -> None:
    """Sampled choices (seeded): two of them, indexes 0 and 1, each of max_tokens tokens."""
    prompt_len = len(hf.chat_ids(MESSAGES))
    args = {"model": "", "messages": MESSAGES, "n": 2, "temperature": 1.0, "seed": 7,
            "max_tokens": 8, "extra_body": {"ignore_eos": True}}
    out = client.chat.completions.create(**args)
    assert sorted(c.index for c in out.choices) == [0, 1]
    assert all(c.finish_reason == "length" for c in out.choices)
    check_usage(out.usage, prompt_len, 16)

    deltas, finish, usage = streamed(client.chat.completions.create(
        **args, stream=True, stream_options={"include_usage": True}))
    assert finish == {0: "length", 1: "length"}
    assert {i: "".join(d) for i, d in deltas.items()} \
        == {c.index: c.message.content for c in out.choices}  # same seed, same text
    check_usage(usage, prompt_len, 16)


def test_seeded_choices_equal_offline_children(client: openai.OpenAI, llama_dir) -> None:
    """A served request's choices and the offline LLM's n children take their seeds from one rule
    (protos/choice_seed.py): the same seeded request gives the same texts on both paths, and the
    two choices differ from each other."""
    from pagedserve import LLM, SamplingParams

    args = {"temperature": 1.0, "seed": 11, "max_tokens": 10}
    served = client.completions.create(model="", prompt=PROMPTS[2], n=2,
                                       extra_body={"ignore_eos": True}, **args)
    llm = LLM(llama_dir, dtype="float32", num_kv_blocks=64)
    (offline,) = llm.generate([PROMPTS[2]], SamplingParams(n=2, ignore_eos=True, **args))
    texts = [c.text for c in sorted(served.choices, key=lambda c: c.index)]
    assert texts == [c.text for c in offline.outputs]
    assert texts[0] != texts[1]


# --- stop strings ---------------------------------------------------------------------------------


def stop_across_tokens(hf: HF, ref: Reference) -> tuple[str, int]:
    """A stop string that starts inside one generated token and ends inside the next (so the
    router must hold back its first part), and where it first occurs in the greedy text."""
    for i in range(4, len(ref.token_ids) - 1):
        before = hf.tokenizer.decode(ref.token_ids[:i], skip_special_tokens=True)
        after = hf.tokenizer.decode(ref.token_ids[:i + 1], skip_special_tokens=True)
        if not (ref.text.startswith(after) and after.startswith(before)):
            continue
        head, tail = before[-2:], after[len(before):len(before) + 2]
        stop = head + tail
        if len(head) == len(tail) == 2 and "\ufffd" not in stop \
                and ref.text.find(stop) == len(before) - 2:
            return stop, len(before) - 2
    raise AssertionError(f"no usable stop string in {ref.text!r}")


@pytest.mark.parametrize("prompt", PROMPTS[:2])
def test_stop_string_cuts_the_text(client: openai.OpenAI, hf: HF, prompt: str) -> None:
    ref = hf.greedy(prompt, MAX_TOKENS)
    stop, at = stop_across_tokens(hf, ref)
    expected = ref.text[:at]
    out = client.completions.create(model="", prompt=prompt, stop=[stop], **GREEDY)
    assert out.choices[0].text == expected, (stop, ref.text)
    assert out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens < MAX_TOKENS

    deltas, finish, usage = streamed(client.completions.create(
        model="", prompt=prompt, stop=[stop], stream=True,
        stream_options={"include_usage": True}, **GREEDY))
    assert "".join(deltas[0]) == expected and finish == {0: "stop"}
    for i in range(1, len(stop)):  # nothing of the stop string was streamed, even for a moment
        assert not "".join(deltas[0]).endswith(stop[:i]) or expected.endswith(stop[:i])
    assert all(stop not in d for d in deltas[0])
    assert usage.completion_tokens == out.usage.completion_tokens


def test_stop_string_in_chat_stream(client: openai.OpenAI, hf: HF) -> None:
    ref = hf.greedy_ids(hf.chat_ids(MESSAGES), MAX_TOKENS)
    stop, at = stop_across_tokens(hf, ref)
    deltas, finish, _ = streamed(client.chat.completions.create(
        model="", messages=MESSAGES, stop=stop, stream=True, **GREEDY))
    assert "".join(deltas[0]) == ref.text[:at] and finish == {0: "stop"}


# --- the public gRPC API --------------------------------------------------------------------------


def grpc_generate(stub: generation_pb2_grpc.GenerationStub,
                  **fields) -> tuple[list[int], str, generation_pb2.GenerateResponse]:
    responses = list(stub.Generate(generation_pb2.GenerateRequest(**fields), timeout=30))
    assert responses and not any(r.finish_reason for r in responses[:-1])
    return ([t for r in responses for t in r.token_ids], "".join(r.text for r in responses),
            responses[-1])


@pytest.mark.parametrize("prompt", PROMPTS[:2])
def test_grpc_generate_matches_transformers_and_http(
        stub: generation_pb2_grpc.GenerationStub, client: openai.OpenAI, hf: HF,
        prompt: str) -> None:
    ref = hf.greedy(prompt, MAX_TOKENS)
    greedy = {"max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True}
    ids, text, last = grpc_generate(stub, prompt=prompt, **greedy)
    assert ids == ref.token_ids and text == ref.text
    assert last.finish_reason == "length"
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) \
        == (len(ref.prompt_ids), MAX_TOKENS, len(ref.prompt_ids) + MAX_TOKENS)
    # The same prompt as token ids gives the same tokens; the HTTP text is their text.
    assert grpc_generate(stub, prompt_token_ids=generation_pb2.TokenIds(ids=ref.prompt_ids),
                         **greedy)[0] == ref.token_ids
    http = client.completions.create(model="", prompt=prompt, **GREEDY)
    assert http.choices[0].text == text
    tokenized = stub.Tokenize(generation_pb2.TokenizeRequest(text=prompt, add_special_tokens=True),
                              timeout=10)
    assert list(tokenized.token_ids) == ref.prompt_ids


# --- a dropped stream frees its blocks ------------------------------------------------------------


def test_dropped_stream_frees_every_block(serve: Serve, client: openai.OpenAI) -> None:
    max_tokens = 1500  # far more than can be generated before the drop is noticed
    before = metrics(serve.base_url)
    assert before["kv_cache_blocks_free"] == before["kv_cache_blocks_total"] > 0

    stream = client.completions.create(model="", prompt=PROMPTS[0], max_tokens=max_tokens,
                                       temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    chunks = [next(stream), next(stream)]
    assert all(c.choices[0].finish_reason is None for c in chunks)
    during = metrics(serve.base_url)
    assert during["num_requests_running"] == 1
    assert during["kv_cache_blocks_free"] < during["kv_cache_blocks_total"]
    stream.close()  # the client goes away mid-stream

    deadline = time.monotonic() + 10
    while True:
        now = metrics(serve.base_url)
        if now["kv_cache_blocks_free"] == now["kv_cache_blocks_total"] \
                and now["num_requests_running"] == now["num_requests_waiting"] == 0:
            break
        assert time.monotonic() < deadline, f"blocks still in use 10 s after the drop: {now}"
        time.sleep(0.1)
    assert now["kv_cache_usage_perc"] == 0
    # Aborted, not finished: finishing would have taken one step per token.
    assert now["scheduler_steps_total"] - before["scheduler_steps_total"] < max_tokens

    # And the server goes on serving.
    out = client.completions.create(model="", prompt=PROMPTS[1], max_tokens=4)
    assert out.usage.completion_tokens == 4


# --- the step loop's time, by phase ---------------------------------------------------------------


def test_metrics_count_the_step_phases(serve: Serve, client: openai.OpenAI) -> None:
    before = metrics(serve.base_url)
    out = client.completions.create(model="", prompt=PROMPTS[0], max_tokens=6, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 6
    now = metrics(serve.base_url)
    delta = {k: now[k] - before[k] for k in now if k.startswith(("step_", "scheduler_steps"))}
    assert delta["scheduler_steps_total"] >= 6, delta
    for phase in ("schedule", "rpc", "execute", "apply"):
        assert delta[f"step_{phase}_seconds_total"] > 0, delta
    assert now["step_rpc_seconds_total"] >= now["step_execute_seconds_total"] > 0
    assert delta["step_running_requests_total"] >= delta["scheduler_steps_total"] - 1, delta
