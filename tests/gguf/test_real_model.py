"""The real model (SmolLM2-135M-Instruct, Q4_1 GGUF) through the offline LLM against transformers'
greedy generate on the same file, both in float32. The engine is given no model: what LLM() loads
by default is what these tests check.

30 prompts (chat and plain, 3 to 500 tokens, the longest ending at max_model_len) served all
together by an engine whose 64-token budget chunks every longer prompt and whose 48-block pool
forces preemption and recompute; then the prompts sharing a long system prompt again, as
prefix-cache hits. Every answer must be transformers' (near-ties excepted, tests/hf_reference.py). A seeded sampled run must give the same tokens alone, batched and
preempted; and the model must know the capital of France, so a silent numerical break cannot pass.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest

from pagedserve import LLM, SamplingParams
from tests.gguf.conftest import HFGGUF, hf_greedy_batch
from tests.hf_reference import TOP, Reference, assert_greedy_matches

pytestmark = [pytest.mark.real_model, pytest.mark.timeout(600)]

N = 12  # generated tokens per prompt
MAX_MODEL_LEN = 512
GREEDY = SamplingParams(temperature=0.0, max_tokens=N, min_tokens=N, logprobs=TOP)
QUESTIONS = [
    "What is the capital of France?", "Name three primary colors.", "What is 7 times 8?",
    "Write a haiku about the sea.", "How do I reverse a list in Python?",
    "Explain photosynthesis in one sentence.", "Who wrote Romeo and Juliet?",
    "Give me a synonym for happy.", "What does HTTP stand for?",
    "Translate 'good morning' into Spanish.", "¿Cuál es la capital de España?",
    "List two uses of a paperclip.",
]
PLAIN = [
    "The quick brown fox", "def fibonacci(n):\n", "Once upon a time, in a small village,",
    "import numpy as np\n\nx = np.", "The three laws of motion are", "1, 1, 2, 3, 5, 8,",
    "SELECT name FROM users WHERE", "Dear hiring manager,\n\n", "<html>\n  <body>\n",
    "Paris is the capital of", "   indented text with   odd   spacing", "日本の首都は",
]
SYSTEM = ("You are a careful assistant for a library. " * 12).strip()  # a long shared prefix
FOLLOW_UPS = ["Where are the history books?", "Can I renew a loan online?",
              "What time do you open?", "Do you have audiobooks?"]


def _chat_ids(hf: HFGGUF, messages: list[dict]) -> list[int]:
    text = hf.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return hf.tokenizer(text, add_special_tokens=False).input_ids


def _long_prompts(hf: HFGGUF) -> list[list[int]]:
    """Two slices of stdlib source ending near max_model_len (prompt + N <= 512)."""
    text = Path(sysconfig.get_paths()["stdlib"], "textwrap.py").read_text()
    ids = hf.tokenizer(text, add_special_tokens=False).input_ids
    return [ids[400 * i: 400 * i + n] for i, n in enumerate((300, MAX_MODEL_LEN - N))]


@pytest.fixture(scope="module")
def prompts(hf_smollm2: HFGGUF) -> dict[str, list[list[int]]]:
    hf = hf_smollm2
    system = {"role": "system", "content": SYSTEM}
    return {
        "chat": [_chat_ids(hf, [{"role": "user", "content": q}]) for q in QUESTIONS],
        "plain": [hf.tokenizer(p, add_special_tokens=False).input_ids for p in PLAIN],
        "long": _long_prompts(hf),
        "prefix": [_chat_ids(hf, [system, {"role": "user", "content": q}]) for q in FOLLOW_UPS],
    }


@pytest.fixture(scope="module")
def refs(hf_smollm2: HFGGUF, prompts) -> dict[str, list[Reference]]:
    return {kind: hf_greedy_batch(hf_smollm2.model, group, N) for kind, group in prompts.items()}


@pytest.fixture(scope="module")
def llm(smollm2: Path) -> LLM:
    # One engine for every condition at once (loading one costs ~15 s): 48 blocks of 16 hold the
    # longest request (32 blocks) but not the whole batch, so requests are preempted and
    # recomputed; a 64-token budget cuts every longer prompt into chunks; prefix caching is on.
    # No model given: the default one, found where `smollm2` found it (the same cache), so every
    # test here checks what LLM() loads against transformers on the file.
    return LLM(dtype="float32", max_model_len=MAX_MODEL_LEN, num_kv_blocks=48,
               max_num_batched_tokens=64)


def _check(llm: LLM, refs: list[Reference]) -> None:
    outs = llm.generate([{"prompt_token_ids": r.prompt} for r in refs], GREEDY, use_tqdm=False)
    for out, ref in zip(outs, refs):
        c = out.outputs[0]
        assert c.finish_reason == "length"
        assert_greedy_matches(c.token_ids, c.logprobs, ref)


def _all(refs: dict[str, list[Reference]]) -> list[Reference]:
    return [r for group in refs.values() for r in group]


def test_at_least_thirty_prompts(refs) -> None:
    assert len(_all(refs)) >= 30
    assert max(len(r.prompt) for r in _all(refs)) == MAX_MODEL_LEN - N


def test_batched_chunked_preempted(llm: LLM, refs) -> None:
    _check(llm, _all(refs))
    stats = llm.scheduler.stats()
    assert stats.num_preemptions > 0
    assert stats.blocks_in_use == 0


def test_prefix_cached(llm: LLM, refs) -> None:
    hits = llm.scheduler.stats().prefix_cache_hits
    _check(llm, refs["prefix"])  # served before: the shared system prompt's blocks are cached
    shared = _common_prefix([r.prompt for r in refs["prefix"]])
    assert shared > 100
    assert llm.scheduler.stats().prefix_cache_hits - hits >= len(FOLLOW_UPS) * (shared // 16) * 16


def _common_prefix(seqs: list[list[int]]) -> int:
    n = 0
    while all(len(s) > n and s[n] == seqs[0][n] for s in seqs):
        n += 1
    return n


def test_seeded_sampling_is_reproducible(llm: LLM, prompts) -> None:
    sampled = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=24)
    mine = [{"prompt_token_ids": p} for p in prompts["chat"][:3]]
    others = [{"prompt_token_ids": p} for p in prompts["plain"][:3] + prompts["prefix"][:1]]
    alone = [o.outputs[0].token_ids for o in llm.generate(mine, sampled, use_tqdm=False)]
    params = [SamplingParams(temperature=0.7, max_tokens=24)] * len(others) + [sampled] * len(mine)
    batched = llm.generate(others + mine, params, use_tqdm=False)[len(others):]
    assert [o.outputs[0].token_ids for o in batched] == alone
    greedy = llm.generate(mine, SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in greedy] != alone  # it did sample


def test_knows_the_capital_of_france(llm: LLM) -> None:
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                     SamplingParams(temperature=0.0, max_tokens=32), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop"
    assert "Paris" in out.text and out.text.rstrip().endswith("."), out.text


def test_llm_without_a_model_serves_the_real_one(llm: LLM, smollm2: Path) -> None:
    assert llm.executor.config.model == str(smollm2)
    assert llm.executor.describe().architecture == "LlamaForCausalLM"
