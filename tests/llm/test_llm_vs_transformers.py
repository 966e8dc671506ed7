"""The whole engine (scheduler + executor through `LLM`) against transformers' greedy generate.

For each tiny architecture, 16 prompts of 1 to 230 tokens, served (a) all together, (b) each alone,
(c) in a KV pool so small that requests are preempted and recomputed, (d) with a token budget that
chunks every prompt, and (e) with prompts sharing a long prefix (prefix-cache hits). Every variant
must give transformers' greedy tokens (near-ties excepted, see tests/hf_reference.py).
"""

from __future__ import annotations

import pytest

from pagedserve import LLM, SamplingParams
from tests.hf_reference import TOP, assert_greedy_matches, hf_greedy, stdlib_prompts

LENGTHS = [1, 2, 5, 9, 15, 16, 17, 24, 31, 33, 48, 64, 80, 100, 129, 230]
N = 20  # generated tokens per prompt
# min_tokens masks EOS as transformers' min_new_tokens does, so both sides pick the same argmax.
GREEDY = SamplingParams(temperature=0.0, max_tokens=N, min_tokens=N, logprobs=TOP)


def _llm(path, **kw) -> LLM:
    kw.setdefault("num_kv_blocks", 512)
    return LLM(path, dtype="float32", **kw)


def _check(llm: LLM, refs) -> float:
    outs = llm.generate([{"prompt_token_ids": r.prompt} for r in refs], GREEDY, use_tqdm=False)
    worst = 0.0
    for out, ref in zip(outs, refs):
        c = out.outputs[0]
        assert c.finish_reason == "length"
        worst = max(worst, assert_greedy_matches(c.token_ids, c.logprobs, ref))
    return worst


@pytest.fixture
def refs(tiny_model):
    from transformers import AutoTokenizer

    prompts = stdlib_prompts(AutoTokenizer.from_pretrained(tiny_model), LENGTHS)
    return hf_greedy(tiny_model, prompts, N)


def test_all_together(tiny_model, refs) -> None:
    _check(_llm(tiny_model), refs)


def test_each_alone(tiny_model, refs) -> None:
    llm = _llm(tiny_model)
    for ref in refs:
        _check(llm, [ref])


def test_preemption_and_recompute(tiny_model, refs) -> None:
    # The longest request needs 16 blocks of 16; 24 blocks cannot hold 16 requests at once.
    llm = _llm(tiny_model, num_kv_blocks=24, max_model_len=256)
    _check(llm, refs)
    assert llm.scheduler.stats().num_preemptions > 0
    assert llm.scheduler.stats().blocks_in_use == 0


def test_every_prompt_chunked(tiny_model, refs) -> None:
    # A budget of 12 tokens cuts every prompt longer than that into chunks, over a 32-token block.
    llm = _llm(tiny_model, max_num_batched_tokens=12, block_size=32)
    long_refs = [r for r in refs if len(r.prompt) > 12]
    _check(llm, long_refs)


def test_shared_prefix_hits(tiny_model) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    prefix = tok(" ".join(["the shared system prompt"] * 20), add_special_tokens=False).input_ids
    prompts = stdlib_prompts(tok, [3, 9, 20, 40, 70, 6], prefix=prefix)
    refs = hf_greedy(tiny_model, prompts, N)
    llm = _llm(tiny_model)
    _check(llm, refs[:1])  # the prefix is now cached
    _check(llm, refs[1:])
    stats = llm.scheduler.stats()
    assert stats.prefix_cache_hits >= 5 * (len(prefix) // 16) * 16
    assert 0 < stats.prefix_cache_hit_rate < 1
