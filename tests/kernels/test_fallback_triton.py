"""The transformers fallback through the Triton kernels (interpreted on the CPU) gives the tokens
the reference kernels give: Gemma 2 brings soft-capping and alternating sliding-window layers,
Falcon one K/V head for all queries."""

from __future__ import annotations

import pytest

from tests.conftest import model_dir


def _greedy(arch: str) -> tuple[list[list[int]], object]:
    import torch

    from pagedserve import LLM, SamplingParams

    device = "cuda" if torch.cuda.is_available() else "cpu"
    llm = LLM(model_dir(arch, "micro"), dtype="float32", model_impl="transformers",
              num_kv_blocks=16, block_size=8, max_model_len=128, max_num_batched_tokens=16,
              device=device)
    # 30 tokens: two chunks under the 16-token budget, and past the 16-token window.
    prompts = [{"prompt_token_ids": [0, *range(40, 69)]}, {"prompt_token_ids": [0, 7, 8]}]
    params = SamplingParams(temperature=0.0, max_tokens=4, min_tokens=4)
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], llm.executor.model.backend


@pytest.mark.triton
@pytest.mark.parametrize("arch", ["gemma2", "falcon"])
def test_fallback_on_triton_gives_the_reference_tokens(tk, arch, monkeypatch) -> None:
    monkeypatch.setenv("PAGEDSERVE_ATTENTION_BACKEND", "reference")
    expected, ref_backend = _greedy(arch)
    monkeypatch.setenv("PAGEDSERVE_ATTENTION_BACKEND", "triton")
    got, backend = _greedy(arch)
    assert ref_backend.__name__ == "pagedserve.kernels.reference" and backend is tk
    assert got == expected
