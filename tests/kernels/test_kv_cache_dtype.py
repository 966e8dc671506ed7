"""A KV cache narrower than the model (--kv-cache-dtype bfloat16 / fp8) through every backend:
write_kv converts, paged_attention reads back and upcasts.

The twin is plain PyTorch and shares no conversion code with the kernels: torch's own
`.to(torch.float8_e4m3fn)` (after dividing by the scale and saturating to +-448) and `.float()`.
  - the bytes a backend writes must equal the twin's exactly (the C and Triton conversions are
    bit-level code of their own);
  - attention over the cache must equal float64 attention over the twin's dequantized K/V to
    float32 arithmetic (bf16 queries: their output rounding);
  - against attention over the unquantized K/V, fp8 must stay within a bound derived from e4m3's
    precision (below), which shows the scales are applied on the way in and the way out.
The C kernels are also built without AVX-512 and without AVX2, so each SIMD path is tested here.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pagedserve.kernels import reference
from pagedserve.kernels.cpu import attention as cpu_attention
from pagedserve.kernels.cpu import build
from pagedserve.kernels.cpu import kv_write as cpu_kv_write
from pagedserve.kernels.reference import attention as reference_attention
from tests.kernels.common import DEVICE, ON_GPU, rel_err

FP8 = torch.float8_e4m3fn
NARROWER = {"cpu": (), "cpu-avx2": ("-mno-avx512f",), "cpu-portable": ("-mno-avx2", "-mno-avx512f")}
# (q_len, seq_len) per sequence: decode rows, short multi-query rows (the CPU's C path row by
# row), a prompt chunk of more than 8 rows (the reference's prompt path on the CPU)
SEQS = [(1, 1), (1, 40), (1, 17), (4, 23), (12, 12), (1, 70)]
ARITH_TOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3}


def twin_store(x: torch.Tensor, cache_dtype: torch.dtype, scale: float) -> torch.Tensor:
    if cache_dtype == FP8:
        return (x.float() / scale).clamp(-448.0, 448.0).to(FP8)
    return x.to(cache_dtype)


def twin_load(stored: torch.Tensor, scale: float) -> torch.Tensor:
    return stored.double() * (scale if stored.dtype == FP8 else 1.0)


@pytest.fixture(params=["reference", *NARROWER, "triton"])
def backend(request, monkeypatch):
    """A kernel module; the CPU variants run the C kernels of one SIMD path."""
    name = request.param
    if name == "reference":
        return reference
    if name == "triton":
        if not ON_GPU:
            request.applymarker(pytest.mark.triton)
        return request.getfixturevalue("tk")
    if "avx2" not in build.cpu_flags() and name == "cpu-avx2":
        pytest.skip("this CPU has no AVX2")
    libs = {lib: build.load(lib, NARROWER[name])[0] for lib in ("paged_decode", "kv_write")}
    if any(lib is None for lib in libs.values()):
        pytest.skip("no C compiler")
    monkeypatch.setattr(cpu_attention, "load", lambda lib: (libs[lib], ""))
    monkeypatch.setattr(cpu_kv_write, "load", lambda lib: (libs[lib], ""))
    from pagedserve.kernels import cpu

    return cpu


def _poisoned_cache(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """NaN everywhere (0x7f for fp8): a kernel reading a slot outside every context shows it."""
    if dtype == FP8:
        return torch.full(shape, 0x7F, dtype=torch.uint8, device=DEVICE).view(FP8)
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def _setup(q_dtype, cache_dtype, *, heads=(4, 2), head_dim=32, block_size=8, seqs=SEQS):
    """Contexts K/V (exact, q's dtype) of every sequence, their pages, and the step's queries."""
    num_q, num_kv = heads
    need = [-(-n // block_size) for _, n in seqs]
    ids = torch.randperm(sum(need) + 2).tolist()
    tables = torch.tensor([[ids.pop() for _ in range(n)] + [0] * (max(need) - n) for n in need],
                          dtype=torch.int32)
    k = [(torch.randn(n, num_kv, head_dim) * 2).to(q_dtype) for _, n in seqs]
    v = [torch.randn(n, num_kv, head_dim).to(q_dtype) for _, n in seqs]
    q = torch.randn(sum(ql for ql, _ in seqs), num_q, head_dim).to(q_dtype)
    shape = (sum(need) + 2, block_size, num_kv, head_dim)
    return q, k, v, tables, shape


def _slots(tables: torch.Tensor, n: int, i: int, block_size: int) -> torch.Tensor:
    pos = torch.arange(n)
    return tables[i, pos // block_size].long() * block_size + pos % block_size


def _write_all(backend, k, v, tables, shape, cache_dtype, scales):
    """Every context written through the backend's write_kv in one call (a padding slot too)."""
    k_cache, v_cache = _poisoned_cache(shape, cache_dtype), _poisoned_cache(shape, cache_dtype)
    slots = torch.cat([_slots(tables, len(ki), i, shape[1]) for i, ki in enumerate(k)])
    key, value = torch.cat(k), torch.cat(v)
    pad = torch.full((1,), -1, dtype=torch.int64)
    backend.write_kv(torch.cat([key, key[:1] * 0 + 9.0]).to(DEVICE),
                     torch.cat([value, value[:1]]).to(DEVICE), k_cache, v_cache,
                     torch.cat([slots, pad]).to(DEVICE), k_scale=scales[0], v_scale=scales[1])
    return k_cache, v_cache, slots


def _sequences(q, k, v, seqs):
    """Per sequence, float64 [heads, rows, dim] queries (its last q_len positions), keys and
    values with the KV heads repeated for their query heads, and the causal mask [rows, n]."""
    row = 0
    for (ql, n), ki, vi in zip(seqs, k, v):
        qi = q[row:row + ql].double().transpose(0, 1)
        group = qi.shape[0] // ki.shape[1]
        kk = ki.double().repeat_interleave(group, 1).transpose(0, 1)
        vv = vi.double().repeat_interleave(group, 1).transpose(0, 1)
        yield qi, kk, vv, torch.arange(n)[None, :] <= torch.arange(n - ql, n)[:, None]
        row += ql


def _dense(q, k, v, seqs, scale) -> torch.Tensor:
    """float64 causal attention of each sequence's last q_len positions over its context."""
    return torch.cat([F.scaled_dot_product_attention(qi, kk, vv, attn_mask=mask, scale=scale)
                      .transpose(0, 1) for qi, kk, vv, mask in _sequences(q, k, v, seqs)])


def _attend(backend, q, k_cache, v_cache, tables, seqs, scale, scales) -> torch.Tensor:
    cu = torch.tensor([0, *torch.tensor([ql for ql, _ in seqs]).cumsum(0).tolist()],
                      dtype=torch.int32)
    lens = torch.tensor([n for _, n in seqs], dtype=torch.int32)
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=DEVICE)
    backend.paged_attention(q.to(DEVICE), k_cache, v_cache, cu.to(DEVICE), lens.to(DEVICE),
                            tables.to(DEVICE), out, scale=scale,
                            max_seqlen_q=max(ql for ql, _ in seqs),
                            max_seqlen_k=max(n for _, n in seqs), k_scale=scales[0],
                            v_scale=scales[1])
    return out.cpu()


CASES = [  # (q dtype, cache dtype, (k_scale, v_scale))
    (torch.float32, FP8, (1.0, 1.0)), (torch.float32, FP8, (0.05, 0.02)),
    (torch.bfloat16, FP8, (0.05, 0.02)), (torch.float32, torch.bfloat16, (1.0, 1.0)),
]


@pytest.mark.parametrize(("q_dtype", "cache_dtype", "scales"), CASES)
def test_write_then_attend_equals_the_torch_twin(backend, q_dtype, cache_dtype, scales) -> None:
    if backend.__name__.endswith("triton") and not ON_GPU and torch.bfloat16 in (q_dtype,
                                                                                cache_dtype):
        # its tl.dot is wrong in bf16, and it truncates float32 -> bf16 where a GPU rounds
        pytest.skip("bf16 under the Triton interpreter: a GPU check")
    seqs = SEQS[:4] if backend.__name__.endswith("triton") else SEQS
    q, k, v, tables, shape = _setup(q_dtype, cache_dtype, seqs=seqs)
    k_cache, v_cache, slots = _write_all(backend, k, v, tables, shape, cache_dtype, scales)
    stored_k = twin_store(torch.cat(k), cache_dtype, scales[0])
    stored_v = twin_store(torch.cat(v), cache_dtype, scales[1])
    bits = torch.uint8 if cache_dtype == FP8 else torch.int16
    flat_k = k_cache.cpu().view(-1, *shape[2:])[slots]
    flat_v = v_cache.cpu().view(-1, *shape[2:])[slots]
    assert torch.equal(flat_k.view(bits), stored_k.view(bits))
    assert torch.equal(flat_v.view(bits), stored_v.view(bits))
    twin_k = twin_load(stored_k, scales[0]).split([len(x) for x in k])
    twin_v = twin_load(stored_v, scales[1]).split([len(x) for x in v])
    out = _attend(backend, q, k_cache, v_cache, tables, seqs, 0.17, scales)
    assert rel_err(out, _dense(q, twin_k, twin_v, seqs, 0.17)) < ARITH_TOL[q_dtype]


def _e4m3_bound(q, k, v, seqs, scale, scales) -> torch.Tensor:
    """Per output element, how far fp8 K/V can move float64 attention. A stored e4m3 value is
    within half an ulp of x / s: 2^-4 |x / s| for normal values (3 mantissa bits), 2^-10 below
    2^-6 (subnormal steps of 2^-9); so |k' - k| <= ek = 2^-4 |k| + 2^-10 s_k, likewise ev. A score
    moves by at most d = scale * |q| . ek, so each probability by a factor within e^(+-2 dmax),
    and |out' - out| <= (e^(2 dmax) - 1) P.(|v| + ev) + P.ev."""
    bounds = []
    for qi, kk, vv, mask in _sequences(q, k, v, seqs):
        ek, ev = 2**-4 * kk.abs() + 2**-10 * scales[0], 2**-4 * vv.abs() + 2**-10 * scales[1]
        p = torch.softmax((qi @ kk.transpose(1, 2) * scale).masked_fill(~mask, float("-inf")), -1)
        d = (scale * qi.abs() @ ek.transpose(1, 2)).masked_fill(~mask, 0).amax(-1, keepdim=True)
        bounds.append(((2 * d).expm1() * (p @ (vv.abs() + ev)) + p @ ev).transpose(0, 1))
    return torch.cat(bounds)


@pytest.mark.parametrize("scales", [(1.0, 1.0), (0.05, 0.02)])
def test_fp8_error_within_the_e4m3_bound(backend, scales) -> None:
    seqs = SEQS[:4] if backend.__name__.endswith("triton") else SEQS
    q, k, v, tables, shape = _setup(torch.float32, FP8, seqs=seqs)
    k_cache, v_cache, _ = _write_all(backend, k, v, tables, shape, FP8, scales)
    out = _attend(backend, q, k_cache, v_cache, tables, seqs, 0.17, scales).double()
    exact = _dense(q, k, v, seqs, 0.17)
    bound = _e4m3_bound(q, k, v, seqs, 0.17, scales)
    assert ((out - exact).abs() <= bound + 1e-5).all()
    assert rel_err(out, exact) > 1e-4  # the cache really was fp8


def test_saturation_and_nan_match_torch(backend) -> None:
    """Values past +-448 (after the scale) saturate; NaN stays NaN; -0 and subnormals round as
    torch rounds them."""
    special = torch.tensor([1e6, -1e6, 449.0, 464.0, float("nan"), -0.0, 2**-10, 3 * 2**-11,
                            2**-7 * 1.0625, 0.1, -5.5, 240.0, 2**-9 * 0.5, 2**-9 * 1.5, 7.0, 1.0])
    key = special.repeat(2).view(1, 2, 16)
    k_cache, v_cache = _poisoned_cache((2, 8, 2, 16), FP8), _poisoned_cache((2, 8, 2, 16), FP8)
    slot = torch.tensor([5], dtype=torch.int64, device=DEVICE)
    backend.write_kv(key.to(DEVICE), key.to(DEVICE), k_cache, v_cache, slot, k_scale=1.0,
                     v_scale=0.5)
    want_k, want_v = twin_store(key, FP8, 1.0), twin_store(key, FP8, 0.5)
    assert torch.equal(k_cache.cpu()[0, 5].view(torch.uint8), want_k[0].view(torch.uint8))
    assert torch.equal(v_cache.cpu()[0, 5].view(torch.uint8), want_v[0].view(torch.uint8))


@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16])
def test_the_cpu_backend_stays_in_c_for_narrow_caches(monkeypatch, q_dtype) -> None:
    """Decode rows and short multi-query rows over an fp8 cache (and a bf16 one under float32)
    are the C kernels' work: the reference attends nothing and writes nothing."""
    from pagedserve.kernels import cpu

    if build.load("paged_decode")[0] is None or build.load("kv_write")[0] is None:
        pytest.skip("no C compiler")
    monkeypatch.setattr(reference_attention, "_attend_span", lambda *a, **k: 1 / 0)
    monkeypatch.setattr(cpu_kv_write.reference, "write_kv", lambda *a, **k: 1 / 0)
    seqs = [(1, 5), (1, 33), (3, 20)]
    for cache_dtype in [FP8, *([torch.bfloat16] if q_dtype == torch.float32 else [])]:
        q, k, v, tables, shape = _setup(q_dtype, cache_dtype, seqs=seqs)
        k_cache, v_cache, _ = _write_all(cpu, k, v, tables, shape, cache_dtype, (0.5, 0.25))
        out = _attend(cpu, q, k_cache, v_cache, tables, seqs, 0.2, (0.5, 0.25))
        assert not out.isnan().any()
