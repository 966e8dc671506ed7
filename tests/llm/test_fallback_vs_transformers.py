"""The transformers fallback, whole engine (`LLM(model_impl="transformers")`), against transformers'
greedy generate on the same weights, for every architecture make-model knows (the native four too).

Per architecture (micro size: 2 layers, hidden 64, float32): one prompt that shares a prefix with a
later one runs alone and leaves its full blocks in the prefix cache; then five prompts run as one
batch under a 16-token budget, so the longer ones are cut into chunks and the last one starts on
the cached prefix. Every token must be transformers' (near-ties excepted, tests/hf_reference.py).
"""

from __future__ import annotations

import pytest

from pagedserve import LLM, SamplingParams
from pagedserve.make_model import ARCHITECTURES
from tests.conftest import model_dir
from tests.hf_reference import TOP, assert_greedy_matches, hf_greedy, stdlib_prompts

N = 8  # generated tokens per prompt
BLOCK, BUDGET = 8, 16  # KV block size and tokens per step: prompts of 19 and 45 tokens chunk
GREEDY = SamplingParams(temperature=0.0, max_tokens=N, min_tokens=N, logprobs=TOP)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Micro models make many tiny GEMMs: a second thread mostly waits, and on a busy machine
    each wait costs milliseconds (hundreds of times a 64-wide GEMM)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _check(llm: LLM, refs) -> None:
    outs = llm.generate([{"prompt_token_ids": r.prompt} for r in refs], GREEDY, use_tqdm=False)
    for out, ref in zip(outs, refs):
        assert_greedy_matches(out.outputs[0].token_ids, out.outputs[0].logprobs, ref)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_fallback_gives_transformers_greedy_tokens(arch: str) -> None:
    from transformers import AutoTokenizer

    from pagedserve.executor.models.transformers_backend import TransformersForCausalLM

    path = model_dir(arch, "micro")
    tok = AutoTokenizer.from_pretrained(path)
    prefix = tok(" ".join(["the shared system prompt"] * 5), add_special_tokens=False).input_ids
    prompts = stdlib_prompts(tok, [1, 6, 19, 45]) + stdlib_prompts(tok, [4, 25], prefix=prefix)
    refs = hf_greedy(path, prompts, N)
    llm = LLM(path, dtype="float32", model_impl="transformers", num_kv_blocks=64,
              block_size=BLOCK, max_num_batched_tokens=BUDGET)
    assert isinstance(llm.executor.model, TransformersForCausalLM)
    _check(llm, refs[4:5])  # alone: its full prefix blocks stay cached
    _check(llm, refs[:4] + refs[5:])  # a batch, chunked, the last prompt on the cached prefix
    cached = (len(prefix) + 1) // BLOCK * BLOCK  # BOS + prefix, in whole blocks
    assert llm.scheduler.stats().prefix_cache_hits >= cached >= 2 * BLOCK
