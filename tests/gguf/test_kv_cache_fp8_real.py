"""The real model (SmolLM2-135M-Instruct) with an fp8 KV cache against transformers' float32
greedy generate on the same GGUF file.

fp8 rounds every stored K/V to 3 mantissa bits (2^-4 relative), so the answers may drift from
transformers' after a while; on the real model, whose logit gaps are wider than the tiny random
models', the first tokens must be transformers' exactly (measured, 12 tokens of 5 chat prompts:
fp8 first differed from the float32 cache at tokens 6 and 8 of two prompts, at near-even top-2
gaps of 0.24-0.26), and France's capital must stay Paris.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pagedserve import LLM, SamplingParams
from tests.gguf.conftest import HFGGUF, hf_greedy_batch

pytestmark = [pytest.mark.real_model, pytest.mark.slow, pytest.mark.timeout(600)]

FIRST = 4  # tokens that must be transformers' exactly
QUESTIONS = ["What is the capital of France?", "Name three primary colors.",
             "Write a haiku about the sea.", "How do I reverse a list in Python?",
             "Who wrote Romeo and Juliet?", "What does HTTP stand for?"]


def test_fp8_cache_answers_as_transformers(smollm2: Path, hf_smollm2: HFGGUF) -> None:
    tok = hf_smollm2.tokenizer
    prompts = [tok(tok.apply_chat_template([{"role": "user", "content": q}],
                                           add_generation_prompt=True, tokenize=False),
                   add_special_tokens=False).input_ids for q in QUESTIONS]
    refs = hf_greedy_batch(hf_smollm2.model, prompts, 8)
    llm = LLM(smollm2, dtype="float32", kv_cache_dtype="fp8", num_kv_blocks=64,
              max_model_len=512)
    assert llm.executor.kv_cache.k[0].element_size() == 1
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=8, min_tokens=8),
                        use_tqdm=False)
    for out, ref in zip(outs, refs, strict=True):
        assert out.outputs[0].token_ids[:FIRST] == ref.tokens[:FIRST], tok.decode(ref.prompt)
    assert "Paris" in outs[0].outputs[0].text
