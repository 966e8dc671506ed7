"""--batch-invariant (executor/batch_invariance.py) on the real model in bf16: a request's tokens
and logprobs are bit for bit the same alone and batched with others in a pool so small that the
batch is preempted and recomputed (prompt and outputs so far in one prompt pass, split in chunks:
what an executor or scheduler restart does), greedy and seeded; and a greedy request recomputed
from its prompt and a cut of its outputs goes on as it did. The same comparison with the layers
switched back to their usual form differs, so it can fail."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pagedserve.executor.batch_invariance import at_least_rows, probe_min_rows
from pagedserve.kernels.cpu import panel_gemm512
from pagedserve.llm import LLM
from pagedserve.sampling_params import SamplingParams

pytestmark = pytest.mark.real_model
TEXTS = ("The history of the Roman empire is", "def fibonacci(n):", "Hi")
MAX_TOKENS, CUTS = 16, (4, 11)
Run = tuple[list[int], list[list[tuple[int, float]]]]  # tokens, and each step's top 2


@pytest.fixture(scope="module")
def llm(smollm2: Path) -> LLM:
    # a budget of 16 tokens a step: a recomputed prompt of 5-18 tokens may be split in chunks,
    # and the batched prompts share steps with each other's decodes; 4 blocks of 16 cannot hold
    # the three batched requests' 2 blocks each, so the batch preempts. The weights go through
    # oneDNN, whose one-row kernel needs the row floors (panel_gemm512, where it is preferred,
    # needs none: tests/kernels/test_cpu_panel_gemm512.py)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(panel_gemm512, "preferred", lambda: False)
        return LLM(str(smollm2), dtype="bfloat16", quantization="dequantize",
                   batch_invariant=True, enable_prefix_caching=False, max_num_batched_tokens=16,
                   num_kv_blocks=4, max_model_len=64)


def _params(max_tokens: int, seeded: bool) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, logprobs=2, ignore_eos=True,
                          **({"temperature": 1.0, "seed": 7} if seeded else {"temperature": 0}))


def _runs(llm: LLM, prompts: list[list[int]], max_tokens: int, seeded: bool) -> list[Run]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], _params(max_tokens, seeded))
    return [(list(o.outputs[0].token_ids),
             [sorted(step.items()) for step in o.outputs[0].logprobs])
            for o in outs]


def _mismatches(llm: LLM, seeded: bool, first: bool = False) -> list[str]:
    """Where a request alone, in a batch, or recomputed from a cut does not repeat its run alone
    (tokens and every step's top-2 logprobs, exactly); first: stop at the first."""
    prompts = [llm.tokenizer.encode(t) for t in TEXTS]
    alone = [_runs(llm, [p], MAX_TOKENS, seeded)[0] for p in prompts]
    preemptions = llm.scheduler.num_preemptions
    wrong = [f"{TEXTS[i]!r} batched" for i, run in
             enumerate(_runs(llm, prompts, MAX_TOKENS, seeded)) if run != alone[i]]
    assert llm.scheduler.num_preemptions > preemptions, "the batch should have been preempted"
    if wrong and first:
        return wrong
    for i, (p, (tokens, steps)) in enumerate(zip(prompts, alone)):
        if seeded:  # a seeded draw depends on the output's index, which a cut would restart
            continue
        recomputed = _runs(llm, [p + tokens[:k] for k in CUTS], MAX_TOKENS - min(CUTS), seeded)
        for k, (got_tokens, got_steps) in zip(CUTS, recomputed):
            if got_tokens[:MAX_TOKENS - k] != tokens[k:] or got_steps[:MAX_TOKENS - k] != steps[k:]:
                wrong.append(f"{TEXTS[i]!r} recomputed from {k}")
    return wrong


@pytest.mark.parametrize("seeded", [False, True], ids=["greedy", "seeded"])
def test_a_request_is_computed_the_same_alone_batched_and_recomputed(llm: LLM,
                                                                     seeded: bool) -> None:
    assert _mismatches(llm, seeded) == []


def test_the_comparison_fails_without_the_row_floors(llm: LLM) -> None:
    """With every layer back to multiplying the rows it is given (one row through oneDNN's
    one-row kernel), the same comparison finds a difference."""
    layers = [m for m in llm.executor.model.modules() if hasattr(m, "min_rows")]
    floors = [m.min_rows for m in layers]
    assert max(floors) > 1, "the probe should have found a layer to pad"
    try:
        for m in layers:
            m.min_rows = 1
        assert _mismatches(llm, seeded=False, first=True)
    finally:
        for m, floor in zip(layers, floors):
            m.min_rows = floor


def test_a_down_projection_is_padded_where_one_row_runs_another_kernel(llm: LLM) -> None:
    """What the probe found, checked on its own terms: with the floor it chose every row of a
    256-row product equals that row multiplied alone (padded), and where the floor is above 1,
    one row unpadded does not."""
    seen = set()
    for name, m in llm.executor.model.named_modules():
        if not hasattr(m, "min_rows") or m.product_key() in seen:
            continue
        seen.add(m.product_key())
        x = torch.randn(256, m.product_key()[1], generator=torch.Generator().manual_seed(1))
        x = x.to(torch.bfloat16)
        whole = m.row_product(x)
        alone = torch.cat([at_least_rows(m.row_product, x[i:i + 1], m.min_rows)
                           for i in range(len(x))])
        assert torch.equal(alone, whole), name
        if m.min_rows > 1:
            plain = torch.cat([m.row_product(x[i:i + 1]) for i in range(len(x))])
            assert not torch.equal(plain, whole), name


def _sum_by_rows(x: torch.Tensor) -> torch.Tensor:
    """A product whose rows depend on their count: one row alone is summed in float64. The
    others are summed elementwise, not by the BLAS, whose kernel may change with the row count
    below 4 (MKL's float32 GEMM does on an Intel Xeon)."""
    w = torch.linspace(-1, 1, x.shape[1] * 4).view(4, x.shape[1])
    if x.shape[0] == 1:
        return (x.double() @ w.double().T).float()
    return (x[:, None, :] * w).sum(-1)


def test_the_probe_pads_a_product_that_changes_below_two_rows_and_refuses_worse() -> None:
    assert probe_min_rows(_sum_by_rows, 64, torch.float32) == 2
    assert probe_min_rows(lambda x: x @ torch.ones(64, 3), 64, torch.float32) == 1

    def by_count(x: torch.Tensor) -> torch.Tensor:
        return x[:, :3] * (1 + x.shape[0] * 2.0**-20)

    assert probe_min_rows(by_count, 64, torch.float32) is None
