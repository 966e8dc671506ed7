"""fused_experts, the mixture-of-experts MLP: the reference twin against an independent float64
loop over (token, slot), and the CPU grouped path and the Triton grouped GEMM against the
reference, at decode (1-4 rows) and prefill (64+ rows) sizes, top-k 1 and 2, with experts that
get no token."""

from __future__ import annotations

import pytest
import torch

from pagedserve.kernels import reference
from tests.kernels.common import DEVICE, DTYPES, ON_GPU, TOL, nan_allocations, rel_err

# (tokens, experts, top-k, hidden, intermediate); hidden/intermediate not multiples of the tiles.
SHAPES = [(1, 4, 1, 64, 32), (3, 8, 2, 48, 40), (4, 6, 2, 64, 64), (64, 8, 2, 40, 72),
          (70, 5, 1, 32, 48)]
SMALL = [(1, 4, 1, 32, 32), (3, 8, 2, 48, 40), (64, 4, 2, 32, 24)]  # the interpreter's sizes


def _problem(tokens: int, experts: int, top_k: int, hidden: int, inter: int,
             dtype: torch.dtype, device=DEVICE) -> tuple[torch.Tensor, ...]:
    """Random inputs whose routing leaves the last expert (and, with 5+, the first) idle."""
    x = torch.randn(tokens, hidden).to(dtype)
    w13 = (torch.randn(experts, 2 * inter, hidden) / hidden**0.5).to(dtype)
    w2 = (torch.randn(experts, hidden, inter) / inter**0.5).to(dtype)
    used = list(range(1 if experts >= 5 else 0, experts - 1))
    ids = torch.stack([torch.tensor(used)[torch.randperm(len(used))[:top_k]]
                       for _ in range(tokens)])
    weights = torch.rand(tokens, top_k).softmax(-1)
    return tuple(t.to(device) for t in (x, w13, w2, weights, ids.to(torch.int32)))


def _float64_loop(x, w13, w2, weights, ids) -> torch.Tensor:
    """Each (token, slot) on its own, in float64: gate and up, SiLU, product, down, weighted sum."""
    inter = w2.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            h = w13[e].double().cpu() @ x[t].double().cpu()
            gate, up = h[:inter], h[inter:]
            act = gate * torch.sigmoid(gate) * up
            out[t] += float(weights[t, k]) * (w2[e].double().cpu() @ act)
    return out


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_matches_a_float64_loop(shape, dtype) -> None:
    problem = _problem(*shape, dtype, device="cpu")
    out = reference.fused_experts(*problem)
    assert out.dtype == dtype and out.shape == problem[0].shape
    # bf16: the three roundings inside each expert, a few ulp of bf16 relative to the output.
    assert rel_err(out, _float64_loop(*problem)) < (1e-6 if dtype == torch.float32 else 2e-2)


def test_reference_uses_the_routing() -> None:
    """Swapping two tokens' experts or weights changes their outputs: nothing is averaged away."""
    x, w13, w2, weights, _ = _problem(2, 4, 2, 32, 32, torch.float32, device="cpu")
    ids = torch.tensor([[0, 1], [2, 0]], dtype=torch.int32)  # a random draw may give equal rows
    out = reference.fused_experts(x, w13, w2, weights, ids)
    assert not torch.allclose(out, reference.fused_experts(x, w13, w2, weights, ids.flip(0)))
    assert not torch.allclose(out, reference.fused_experts(x, w13, w2, weights.flip(1), ids))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_grouped_path_matches_the_reference(shape, dtype) -> None:
    from pagedserve.kernels import cpu

    problem = _problem(*shape, dtype, device="cpu")
    with nan_allocations():
        out = cpu.fused_experts(*problem)
    want = reference.fused_experts(*problem)
    # Same roundings, same order of the slot sum: only the GEMMs' internal order may differ.
    assert rel_err(out, want) < (1e-6 if dtype == torch.float32 else 1e-2)


def test_cpu_grouped_path_with_no_tokens() -> None:
    from pagedserve.kernels import cpu

    x, w13, w2, weights, ids = _problem(3, 4, 2, 32, 32, torch.float32, device="cpu")
    out = cpu.fused_experts(x[:0], w13, w2, weights[:0], ids[:0])
    assert out.shape == (0, 32)


@pytest.mark.triton
def test_align_by_expert_groups_pairs_in_whole_blocks(tk) -> None:
    from pagedserve.kernels.triton.moe import align_by_expert

    ids = torch.tensor([[3, 0], [3, 1], [0, 3], [3, 0]], dtype=torch.int32, device=DEVICE)
    sorted_ids, block_expert = align_by_expert(ids, num_experts=5, block_m=2)
    pad = ids.numel()
    # expert 0: pairs 1, 4, 7; expert 1: pair 3; expert 3: pairs 0, 2, 5, 6; 2 and 4: none.
    assert sorted_ids[:10].tolist() == [1, 4, 7, pad, 3, pad, 0, 2, 5, 6]
    assert block_expert.tolist()[:5] == [0, 0, 1, 3, 3]
    assert set(block_expert.tolist()[5:]) <= {-1} and set(sorted_ids[10:].tolist()) <= {pad}


@pytest.mark.triton
@pytest.mark.parametrize("shape", SMALL)
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_matches_the_reference(tk, shape, dtype) -> None:
    problem = _problem(*shape, dtype)
    with nan_allocations():
        out = tk.fused_experts(*problem)
    want = reference.fused_experts(*(t.cpu() for t in problem))
    assert out.dtype == dtype and out.shape == problem[0].shape
    assert rel_err(out.cpu(), want) < TOL[dtype]


@pytest.mark.cuda
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("tokens", [1, 4, 512])
def test_triton_at_model_sizes_on_cuda(tk, tokens) -> None:
    """Mixtral-like widths in bf16 (wrong under the interpreter, so a GPU check)."""
    problem = _problem(tokens, 8, 2, 1024, 1408, torch.bfloat16)
    out = tk.fused_experts(*problem)
    want = reference.fused_experts(*problem)
    assert rel_err(out, want) < TOL[torch.bfloat16]
