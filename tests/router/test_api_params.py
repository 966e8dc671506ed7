"""Every OpenAI parameter the router supports, through the official `openai` client, against the
fake scheduler (whose outputs and logprobs are known in advance)."""

from __future__ import annotations

import openai
import pytest

from pagedserve.router.tokenizer import Tokenizer
from tests.router.conftest import SERVED
from tests.router.fake_scheduler import FakeScheduler

pytestmark = pytest.mark.timeout(60)
PROMPT = "def fibonacci(n):"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]


def tokens(prompt_ids: list[int], seed: int | None, count: int) -> list[int]:
    return FakeScheduler.tokens_for(prompt_ids, seed, count)


def sent_by_id(fake: FakeScheduler) -> dict:
    return {r.request_id: r for r in fake.requests}


# -- completions: prompts ----------------------------------------------------------------------
def test_prompt_kinds_and_choice_indexes(client: openai.OpenAI, fake: FakeScheduler,
                                         tokenizer: Tokenizer) -> None:
    """A string, a list of strings, a list of ids and a list of id lists; prompt i, sample j is
    choice i * n + j."""
    a, b = tokenizer.encode("Hello"), tokenizer.encode("import os")
    for prompt, want in [("Hello", [a]), (["Hello", "import os"], [a, b]), (a, [a]),
                         ([a, b], [a, b])]:
        fake.reset()
        r = client.completions.create(model=SERVED, prompt=prompt, max_tokens=3, n=2, seed=4)
        assert [c.index for c in r.choices] == list(range(2 * len(want)))
        for c in r.choices:
            ids = want[c.index // 2]
            assert c.text == tokenizer.decode(tokens(ids, 4 + c.index % 2, 3))
        assert sorted(list(q.prompt_token_ids) for q in fake.requests) \
            == sorted(ids for ids in want for _ in range(2))
        assert r.usage.prompt_tokens == sum(len(ids) for ids in want)
        assert r.usage.completion_tokens == 3 * 2 * len(want)


def test_batched_prompts_stream(client: openai.OpenAI, tokenizer: Tokenizer) -> None:
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    for chunk in client.completions.create(model=SERVED, prompt=["a b", "c d e"], max_tokens=4,
                                           n=2, seed=1, stream=True):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    whole = client.completions.create(model=SERVED, prompt=["a b", "c d e"], max_tokens=4, n=2,
                                      seed=1)
    assert texts == {c.index: c.text for c in whole.choices} and len(texts) == 4
    assert finish == dict.fromkeys(range(4), "length")


def test_echo(client: openai.OpenAI, tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(PROMPT)
    r = client.completions.create(model=SERVED, prompt=PROMPT, max_tokens=3, seed=2, echo=True)
    assert r.choices[0].text == PROMPT + tokenizer.decode(tokens(ids, 2, 3))
    chunks = list(client.completions.create(model=SERVED, prompt=PROMPT, max_tokens=3, seed=2,
                                            echo=True, stream=True))
    assert chunks[0].choices[0].text == PROMPT
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
    r = client.completions.create(model=SERVED, prompt=ids[1:], max_tokens=2, seed=2, echo=True)
    assert r.choices[0].text.startswith(tokenizer.decode(ids[1:]))


# -- completions: logprobs, best_of ------------------------------------------------------------
def test_completion_logprobs(client: openai.OpenAI, fake: FakeScheduler,
                             tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(PROMPT)
    out = tokens(ids, 3, 5)
    r = client.completions.create(model=SERVED, prompt=PROMPT, max_tokens=5, seed=3, logprobs=2)
    assert fake.requests[-1].sampling.logprobs == 2
    lp = r.choices[0].logprobs
    assert lp.tokens == [tokenizer.token_text(t) for t in out]
    assert lp.token_logprobs == pytest.approx([FakeScheduler.logprob_of(t) for t in out])
    for t, top in zip(out, lp.top_logprobs):
        want = {tokenizer.token_text(i): v for i, v in FakeScheduler.top_of(t, 2)}
        want.setdefault(tokenizer.token_text(t), FakeScheduler.logprob_of(t))
        assert top == pytest.approx(want)
    offsets = [0]
    for text in lp.tokens[:-1]:
        offsets.append(offsets[-1] + len(text))
    assert lp.text_offset == offsets
    # Streamed: the same entries, offsets running on across chunks.
    chunks = list(client.completions.create(model=SERVED, prompt=PROMPT, max_tokens=5, seed=3,
                                            logprobs=2, stream=True))
    streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert [v for x in streamed for v in x.token_logprobs] == lp.token_logprobs
    assert [v for x in streamed for v in x.text_offset] == lp.text_offset


def test_echo_with_logprobs_has_null_prompt_entries(client: openai.OpenAI,
                                                    tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(PROMPT)
    r = client.completions.create(model=SERVED, prompt=PROMPT, max_tokens=2, seed=3, logprobs=0,
                                  echo=True)
    lp = r.choices[0].logprobs
    assert lp.tokens[:len(ids)] == [tokenizer.token_text(t) for t in ids]
    assert lp.token_logprobs[:len(ids)] == [None] * len(ids)
    assert lp.top_logprobs[:len(ids)] == [None] * len(ids)
    out = tokens(ids, 3, 2)
    assert lp.tokens[len(ids):] == [tokenizer.token_text(t) for t in out]
    assert lp.token_logprobs[len(ids):] == pytest.approx([FakeScheduler.logprob_of(t) for t in out])
    assert lp.text_offset[len(ids)] == len(PROMPT)
    for t, top in zip(out, lp.top_logprobs[len(ids):], strict=True):  # logprobs=0: the sampled one
        assert top == pytest.approx({tokenizer.token_text(t): FakeScheduler.logprob_of(t)})


def test_best_of_ranks_by_cumulative_logprob(client: openai.OpenAI, fake: FakeScheduler,
                                             tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(PROMPT)
    r = client.completions.create(model=SERVED, prompt=[PROMPT, PROMPT + " x"], max_tokens=4,
                                  n=2, best_of=4, seed=10)
    assert len(fake.requests) == 8 and all(q.sampling.logprobs == 0 for q in fake.requests)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert all(c.logprobs is None for c in r.choices)  # asked internally, not shown
    candidates = [tokens(ids, 10 + j, 4) for j in range(4)]
    ranked = sorted(candidates, key=lambda ts: -sum(FakeScheduler.logprob_of(t) for t in ts))
    assert [r.choices[0].text, r.choices[1].text] == [tokenizer.decode(ts) for ts in ranked[:2]]
    assert r.usage.completion_tokens == 8 * 4  # every candidate generated counts
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=SERVED, prompt=PROMPT, n=3, best_of=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=SERVED, prompt=PROMPT, n=1, best_of=2, stream=True)


# -- completions: sampling fields --------------------------------------------------------------
def test_sampling_fields_reach_the_scheduler(client: openai.OpenAI, fake: FakeScheduler) -> None:
    client.completions.create(
        model=SERVED, prompt=PROMPT, max_tokens=4, seed=99, temperature=0.7, top_p=0.9,
        presence_penalty=0.5, frequency_penalty=-0.5, logit_bias={"42": 5, "43": -100},
        user="someone", stop=["\n\n", "END"],
        extra_body={"top_k": 7, "min_p": 0.05, "repetition_penalty": 1.2, "min_tokens": 1,
                    "ignore_eos": True, "stop_token_ids": [9]})
    q = fake.requests[-1]
    s = q.sampling
    assert (q.max_tokens, s.seed, s.top_k, q.min_tokens, q.ignore_eos) == (4, 99, 7, 1, True)
    assert [round(x, 4) for x in (s.temperature, s.top_p, s.presence_penalty,
                                  s.frequency_penalty, s.min_p, s.repetition_penalty)] \
        == [0.7, 0.9, 0.5, -0.5, 0.05, 1.2]
    assert dict(s.logit_bias) == {42: 5.0, 43: -100.0} and list(q.stop_token_ids) == [9]
    assert not s.HasField("logprobs")


def test_stop_as_string_and_suffix_refused(client: openai.OpenAI, tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(PROMPT)
    full = tokenizer.decode(tokens(ids, 5, 12))
    stop = full[4:6]
    r = client.completions.create(model=SERVED, prompt=PROMPT, max_tokens=12, seed=5, stop=stop)
    assert r.choices[0].text == full[:full.find(stop)] and r.choices[0].finish_reason == "stop"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=SERVED, prompt=PROMPT, suffix="return x")
    assert e.value.body["param"] == "suffix" and "not supported" in e.value.body["message"]


def test_include_usage_and_continuous_usage(client: openai.OpenAI) -> None:
    chunks = list(client.completions.create(
        model=SERVED, prompt=PROMPT, max_tokens=3, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    assert all(c.usage is not None for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3
    chunks = list(client.completions.create(model=SERVED, prompt=PROMPT, max_tokens=3,
                                            stream=True))
    assert all(c.usage is None for c in chunks)


# -- chat --------------------------------------------------------------------------------------
def test_chat_roles_and_parts(client: openai.OpenAI, fake: FakeScheduler,
                              tokenizer: Tokenizer) -> None:
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be"}, {"type": "text",
                                                                      "text": "brief."}]},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "tool", "content": "42", "tool_call_id": "call_1"},
        {"role": "user", "content": [{"type": "text", "text": "Thanks"}]},
    ]
    client.chat.completions.create(model=SERVED, messages=messages, max_completion_tokens=2)
    flat = [{**m, "content": m["content"] if isinstance(m["content"], str)
             else "\n".join(p["text"] for p in m["content"])} for m in messages]
    assert list(fake.requests[-1].prompt_token_ids) == tokenizer.encode_chat(flat)
    assert fake.requests[-1].max_tokens == 2
    client.chat.completions.create(model=SERVED, messages=messages, max_tokens=3)
    assert fake.requests[-1].max_tokens == 3


def test_chat_logprobs(client: openai.OpenAI, fake: FakeScheduler, tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode_chat(MESSAGES)
    out = tokens(ids, 6, 4)
    r = client.chat.completions.create(model=SERVED, messages=MESSAGES, max_tokens=4, seed=6,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert [e.token for e in content] == [tokenizer.token_text(t) for t in out]
    assert [e.bytes for e in content] == [tokenizer.token_bytes(t) for t in out]
    assert [e.logprob for e in content] == pytest.approx([FakeScheduler.logprob_of(t)
                                                          for t in out])
    for t, e in zip(out, content):
        top = FakeScheduler.top_of(t, 3)
        assert [x.token for x in e.top_logprobs] == [tokenizer.token_text(i) for i, _ in top]
        assert [x.logprob for x in e.top_logprobs] == pytest.approx([v for _, v in top])
    r = client.chat.completions.create(model=SERVED, messages=MESSAGES, max_tokens=4, seed=6,
                                       logprobs=True)
    assert all(e.top_logprobs == [] for e in r.choices[0].logprobs.content)
    assert fake.requests[-1].sampling.logprobs == 0
    chunks = list(client.chat.completions.create(model=SERVED, messages=MESSAGES, max_tokens=4,
                                                 seed=6, logprobs=True, top_logprobs=3,
                                                 stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    r = client.chat.completions.create(model=SERVED, messages=MESSAGES, max_tokens=2)
    assert r.choices[0].logprobs is None


def test_chat_n_stop_seed_penalties_bias(client: openai.OpenAI, fake: FakeScheduler,
                                         tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode_chat(MESSAGES)
    r = client.chat.completions.create(
        model=SERVED, messages=MESSAGES, max_tokens=5, n=3, seed=20, stop=["NEVER"],
        presence_penalty=1.0, frequency_penalty=1.5, logit_bias={"7": 3},
        response_format={"type": "text"}, user="u",
        extra_body={"top_k": 3, "min_p": 0.1, "repetition_penalty": 1.1, "min_tokens": 2,
                    "ignore_eos": True, "skip_special_tokens": False})
    assert [c.message.content for c in r.choices] \
        == [tokenizer.decode(tokens(ids, 20 + j, 5), skip_special_tokens=False)
            for j in range(3)]
    s = fake.requests[-1].sampling
    assert (round(s.presence_penalty, 3), round(s.frequency_penalty, 3), dict(s.logit_bias),
            s.top_k) == (1.0, 1.5, {7: 3.0}, 3)


def test_chat_template_fields(client: openai.OpenAI, fake: FakeScheduler,
                              tokenizer: Tokenizer) -> None:
    partial = [*MESSAGES, {"role": "assistant", "content": "Hello, my"}]
    r = client.chat.completions.create(
        model=SERVED, messages=partial, max_tokens=2, seed=1,
        extra_body={"add_generation_prompt": False, "continue_final_message": True,
                    "echo": True})
    text = tokenizer.decode(list(fake.requests[-1].prompt_token_ids), skip_special_tokens=False)
    assert text.endswith("Hello, my")
    assert r.choices[0].message.content.startswith("Hello, my")
    for extra, param in [({"chat_template": "{{ messages }}"}, "chat_template"),
                         ({"chat_template_kwargs": {"x": 1}}, "chat_template_kwargs"),
                         ({"continue_final_message": True}, "continue_final_message")]:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=SERVED, messages=MESSAGES, extra_body=extra)
        assert e.value.body["param"] == param


def test_trusted_chat_template(llama_dir, scheduler_thread) -> None:
    from pagedserve.router.server import RouterThread

    with RouterThread(llama_dir, scheduler_thread.address,
                      core_options={"trust_request_chat_template": True}) as r:
        client = openai.OpenAI(base_url=r.base_url + "/v1", api_key="x", max_retries=0,
                               timeout=20)
        template = "{% for m in messages %}[{{ m.role }}|{{ m.content }}|{{ tag }}]{% endfor %}"
        client.chat.completions.create(model="", messages=MESSAGES, max_tokens=1, extra_body={
            "chat_template": template, "chat_template_kwargs": {"tag": "T"}})
        sent = scheduler_thread.servicer.requests[-1].prompt_token_ids
        assert r.core.tokenizer.decode(list(sent)) == "[system|Be brief.|T][user|Hi!|T]"
        for bad in ("{{ 1 / 0 }}", "{% for %}", "{{ ''.__class__.__mro__ }}",
                    "{{ raise_exception('no') }}"):
            with pytest.raises(openai.BadRequestError) as e:
                client.chat.completions.create(model="", messages=MESSAGES, max_tokens=1,
                                               extra_body={"chat_template": bad})
            assert "chat_template" in e.value.body["message"] or \
                "chat template" in e.value.body["message"]


@pytest.mark.parametrize("extra,param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "integr"}}}}, "response_format.json_schema.schema"),
    # tools default to tool_choice auto, which needs --tool-call-parser
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"logprobs": False, "top_logprobs": 2}, "top_logprobs"),
])
def test_chat_refusals(client: openai.OpenAI, extra: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=SERVED, messages=MESSAGES, **extra)
    assert e.value.body["param"] == param and e.value.body["type"] == "invalid_request_error"
