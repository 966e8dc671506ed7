"""Triton RMSNorm (plain and fused with the residual add), rotary embedding and SiLU-and-mul
against their references, on outputs and in-place updates."""

from __future__ import annotations

import pytest
import torch

from pagedserve.kernels import reference
from tests.kernels.common import DEVICE, DTYPES, ON_GPU, TOL, nan_allocations

pytestmark = pytest.mark.triton

ROWS = 1000 if ON_GPU else 7


def _close(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Elementwise kernels differ from torch only by an ulp here and there (fused multiply-add,
    rsqrt/exp implementations), which rounding to the dtype can turn into one ulp of output."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert not out.isnan().any()
    tol = TOL[ref.dtype] * 2
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [96, 128, 2048])
def test_rms_norm(tk, dtype, hidden) -> None:
    x = (torch.randn(3, ROWS, hidden, device=DEVICE) * 3).to(dtype)
    weight = torch.randn(hidden, device=DEVICE).to(dtype)
    with nan_allocations():
        out = tk.rms_norm(x, weight, 1e-6)
    _close(out, reference.rms_norm(x, weight, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [96, 2048])
def test_fused_add_rms_norm(tk, dtype, hidden) -> None:
    x = torch.randn(ROWS, hidden, device=DEVICE).to(dtype)
    residual = torch.randn(ROWS, hidden, device=DEVICE).to(dtype)
    weight = torch.randn(hidden, device=DEVICE).to(dtype)
    res_ref = residual.clone()
    out_ref, res_ref_ret = reference.fused_add_rms_norm(x, res_ref, weight, 1e-5)
    with nan_allocations():
        out, res_ret = tk.fused_add_rms_norm(x, residual, weight, 1e-5)
    assert res_ret is residual and res_ref_ret is res_ref
    torch.testing.assert_close(residual, res_ref, rtol=0, atol=0)  # the add: one rounding, exact
    _close(out, out_ref)


def _cos_sin_cache(max_pos: int, rot: int) -> torch.Tensor:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))
    freqs = torch.arange(max_pos, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), -1).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize(("head_dim", "rotary_dim"), [(32, 32), (48, 48), (64, 16)])
def test_rotary_embedding_in_place(tk, dtype, is_neox, head_dim, rotary_dim) -> None:
    tokens, q_heads, kv_heads = (ROWS, 6, 2)
    cache = _cos_sin_cache(4096, rotary_dim)
    positions = torch.randint(0, 4096, (tokens,), device=DEVICE)
    # q and k as views of a fused qkv tensor, as the attention layer produces them
    qkv = torch.randn(tokens, (q_heads + 2 * kv_heads) * head_dim, device=DEVICE).to(dtype)
    q = qkv[:, :q_heads * head_dim].view(tokens, q_heads, head_dim)
    k = qkv[:, q_heads * head_dim:(q_heads + kv_heads) * head_dim].view(tokens, kv_heads, -1)
    before = qkv.clone()
    q_ref, k_ref = q.clone(), k.clone()
    reference.rotary_embedding(positions, q_ref, k_ref, cache, is_neox)
    tk.rotary_embedding(positions, q, k, cache, is_neox)
    _close(q, q_ref)
    _close(k, k_ref)
    v_start = (q_heads + kv_heads) * head_dim
    assert torch.equal(qkv[:, v_start:], before[:, v_start:]), "v was touched"
    assert torch.equal(q[..., rotary_dim:], q_ref[..., rotary_dim:])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 1000, 2816])
def test_silu_and_mul(tk, dtype, d) -> None:
    x = (torch.randn(2, ROWS, 2 * d, device=DEVICE) * 4).to(dtype)
    with nan_allocations():
        out = tk.silu_and_mul(x)
    _close(out, reference.silu_and_mul(x))


def test_same_names_and_signatures_as_reference(tk) -> None:
    """executor/backend.py swaps kernels.triton for kernels.reference: same API, name for name."""
    import inspect

    def params(fn) -> list[tuple]:
        # names, kinds and defaults; not annotations: a backend's packed quantized weight is its
        # own type (kernels/backend.py types it Any)
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]

    assert sorted(tk.__all__) == sorted(reference.__all__)
    for name in reference.__all__:
        assert params(getattr(tk, name)) == params(getattr(reference, name)), name
