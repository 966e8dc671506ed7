"""The whole engine through the Triton kernels (interpreted on the CPU) equals the reference path."""

from __future__ import annotations

import pytest

from tests.conftest import model_dir


def _greedy(arch: str) -> tuple[list[list[int]], object]:
    import torch

    from pagedserve import LLM, SamplingParams

    # On a GPU the engine runs where the Triton kernels do (the default device is the CPU).
    device = "cuda" if torch.cuda.is_available() else "cpu"
    llm = LLM(model_dir(arch), dtype="float32", num_kv_blocks=16, max_model_len=128,
              max_num_batched_tokens=64, device=device)
    prompts = [{"prompt_token_ids": [0, *range(40, 60)]}, {"prompt_token_ids": [0, 7, 8]}]
    params = SamplingParams(temperature=0.0, max_tokens=5, min_tokens=5)
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], llm.executor.model.backend


@pytest.mark.triton
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_triton_backend_gives_the_reference_tokens(tk, arch, monkeypatch) -> None:
    monkeypatch.setenv("PAGEDSERVE_ATTENTION_BACKEND", "reference")
    expected, ref_backend = _greedy(arch)
    monkeypatch.setenv("PAGEDSERVE_ATTENTION_BACKEND", "triton")
    got, backend = _greedy(arch)
    assert ref_backend.__name__ == "pagedserve.kernels.reference" and backend is tk
    assert got == expected
