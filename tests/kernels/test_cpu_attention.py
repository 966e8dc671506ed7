"""The CPU backend's paged attention (decode rows in C, kernels/cpu/paged_decode.c) against dense
float64 attention on the context gathered token by token, over NaN-poisoned caches and outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pagedserve.kernels import cpu
from pagedserve.kernels.cpu import attention as cpu_attention
from pagedserve.kernels.cpu import build
from tests.kernels.common import dense_attention, make_batch, poisoned, rel_err, require_cpu_kernel

CPU = torch.device("cpu")
# bf16 outputs are rounded to bf16 (2^-9 relative); scores and P stay float32 in C
TOL = {torch.float32: 2e-6, torch.bfloat16: 8e-3}


@pytest.fixture(autouse=True)
def built() -> None:
    require_cpu_kernel("paged_decode")


def _on_cpu(batch):
    return type(batch)(*(t.cpu() if isinstance(t, torch.Tensor) else t
                         for t in vars(batch).values()))


def _check(q_lens, seq_lens, *, num_q_heads=8, num_kv_heads=2, head_dim=64, block_size=16,
           dtype=torch.bfloat16, window=0, softcap=0.0, scale=0.3, tol=None) -> torch.Tensor:
    batch = _on_cpu(make_batch(q_lens, seq_lens, num_q_heads=num_q_heads,
                               num_kv_heads=num_kv_heads, head_dim=head_dim,
                               block_size=block_size, dtype=dtype,
                               shared_blocks=min(seq_lens[0], seq_lens[1]) // block_size))
    out = poisoned(batch.q.shape, dtype, CPU)
    cpu.paged_attention(*batch.args(), out, scale=scale, sliding_window=window, softcap=softcap,
                        **batch.bounds())
    assert rel_err(out, dense_attention(batch, scale, window, softcap)) < (tol or TOL[dtype])
    return out


DECODE_LENS = [1, 16, 17, 40, 300, 7, 129, 64]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("num_q_heads", "num_kv_heads", "head_dim"), [
    (12, 4, 64),  # GQA 3 (the small preset)
    (16, 2, 64),  # GQA 8: two head groups of 4 per KV head
    (6, 6, 48),  # MHA, head_dim 48 (3 AVX-512 vectors, 6 AVX2 vectors: one partial chunk)
    (8, 1, 80),  # MQA, head_dim 80 (5 vectors, groups of 2; AVX2: a chunk of 8 and one of 2)
    (4, 2, 128),
    (2, 1, 256),  # one head per group
    (4, 2, 40),  # not a multiple of 16: the portable loop under AVX-512, a short chunk in AVX2
    (4, 2, 36),  # not a multiple of 8: the portable loop everywhere
    (4, 4, 16),
])
def test_decode_rows_head_layouts(dtype, num_q_heads, num_kv_heads, head_dim) -> None:
    _check([1] * len(DECODE_LENS), DECODE_LENS, num_q_heads=num_q_heads,
           num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype)


@pytest.mark.parametrize(("window", "softcap"), [(0, 0.0), (700, 0.0), (263, 25.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_rows_attended_in_parts(dtype, window, softcap) -> None:
    """Windows of more than 32 pages are attended in parts and merged: 2,000 tokens is 4 parts,
    513 tokens 2; a sliding window of 700 starting mid-page; beside short rows."""
    _check([1, 1, 1, 1], [2000, 17, 513, 256], dtype=dtype, window=window, softcap=softcap)


def test_a_long_row_is_bit_for_bit_the_same_alone_and_in_a_batch() -> None:
    """The parts depend on a row's window only: alone (its parts then spread over every thread)
    or among others (work shared differently), the same bits."""
    b = _on_cpu(make_batch([1, 1, 1], [1500, 700, 40], num_q_heads=8, num_kv_heads=2,
                           head_dim=64, block_size=16, dtype=torch.bfloat16))
    together = torch.empty_like(b.q)
    cpu.paged_attention(*b.args(), together, scale=0.3, **b.bounds())
    alone = torch.empty_like(b.q[:1])
    cpu.paged_attention(b.q[:1], b.k_cache, b.v_cache, torch.tensor([0, 1], dtype=torch.int32),
                        b.seq_lens[:1], b.block_tables[:1], alone, scale=0.3, max_seqlen_q=1,
                        max_seqlen_k=1500)
    assert torch.equal(alone, together[:1])


@pytest.mark.parametrize("block_size", [8, 32, 128])
def test_block_sizes(block_size) -> None:
    _check([1] * len(DECODE_LENS), DECODE_LENS, block_size=block_size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_prompt_chunks_and_decode_rows(dtype) -> None:
    # prompt, chunk after a cached prefix, decode rows, an idle sequence, a 1-token prompt
    _check([5, 1, 12, 0, 1, 1], [5, 30, 20, 7, 3, 1], dtype=dtype)


@pytest.mark.parametrize(("window", "softcap"), [(5, 0.0), (16, 0.0), (500, 0.0), (0, 20.0),
                                                 (13, 30.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sliding_window_and_softcap(dtype, window, softcap) -> None:
    _check([1, 1, 4, 1, 1], [40, 33, 20, 5, 90], dtype=dtype, window=window, softcap=softcap)


@pytest.mark.parametrize(("window", "softcap"), [(0, 0.0), (6, 0.0), (0, 30.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_row_attends_causally_in_c(monkeypatch, dtype, window, softcap) -> None:
    """Prompt chunks of any length (here up to 40 rows, after a cached prefix too) and
    speculative verification's few-row spans beside decode rows: each row a decode row of its
    causal context, right with the reference's paths broken (so they are C's)."""
    from pagedserve.kernels.reference import attention as ref

    monkeypatch.setattr(ref, "attend_spans", lambda *a, **k: 1 / 0)
    _check([40, 1, 12, 0, 9, 1, 2, 5, 8], [40, 33, 20, 7, 30, 1, 40, 20, 64], dtype=dtype,
           window=window, softcap=softcap)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_a_row_does_not_depend_on_its_chunk(backend: str) -> None:
    """A 100-token prompt's last 40 rows attended within the whole prompt, as a chunk of their
    own, and one by one as decode rows: bit for bit the same in C; not so in the reference (torch's
    fused attention tiles by the chunk), so the comparison can fail."""
    from pagedserve.kernels import reference

    attention = {"cpu": cpu, "reference": reference}[backend].paged_attention
    b = _on_cpu(make_batch([100], [100], num_q_heads=8, num_kv_heads=2, head_dim=64,
                           block_size=16, dtype=torch.bfloat16))

    def attend(first: int, last: int) -> torch.Tensor:  # rows first..last-1, context up to last
        out = torch.empty(last - first, 8, 64, dtype=torch.bfloat16)
        attention(b.q[first:last], b.k_cache, b.v_cache,
                  torch.tensor([0, last - first], dtype=torch.int32),
                  torch.tensor([last], dtype=torch.int32), b.block_tables, out, scale=0.3,
                  max_seqlen_q=last - first, max_seqlen_k=last)
        return out

    whole, chunk = attend(0, 100)[60:], attend(60, 100)
    alone = torch.cat([attend(i, i + 1) for i in range(60, 100)])
    same = torch.equal(chunk, whole) and torch.equal(alone, whole)
    assert same == (backend == "cpu")


def test_large_scores_stay_finite() -> None:
    """Scores in the hundreds: the softmax must subtract the maximum before exponentiating (else
    exp overflows to inf and the output is NaN). float32 scores near 1000 carry rounding errors
    near 1000 * 2^-24 = 6e-5, so the bound is wider than for scores near 1."""
    _check([1] * 4, [50, 3, 200, 17], scale=40.0, dtype=torch.float32, tol=3e-4)


def test_same_result_on_one_thread_and_two() -> None:
    batch = _on_cpu(make_batch([1] * 9, [300, 2, 45, 100, 16, 1, 77, 250, 33], num_q_heads=12,
                               num_kv_heads=4, head_dim=64, block_size=16, dtype=torch.bfloat16))
    outs = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out = poisoned(batch.q.shape, torch.bfloat16, CPU)
            cpu.paged_attention(*batch.args(), out, scale=0.125, **batch.bounds())
            outs.append(out)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])


def test_strided_queries_like_a_fused_qkv_split() -> None:
    batch = _on_cpu(make_batch([1] * 5, [9, 80, 33, 2, 64], num_q_heads=8, num_kv_heads=2,
                               head_dim=32, block_size=8, dtype=torch.float32))
    qkv = torch.randn(5, (8 + 2 * 2) * 32)
    q = qkv[:, : 8 * 32].view(5, 8, 32)
    q.copy_(batch.q)
    out = poisoned(batch.q.shape, torch.float32, CPU)
    cpu.paged_attention(q, *batch.args()[1:], out, scale=0.2, **batch.bounds())
    assert rel_err(out, dense_attention(batch, 0.2, 0, 0.0)) < TOL[torch.float32]


def test_an_unsupported_dtype_is_still_right() -> None:
    """float16 has no C path: the fallback's answer is checked against dense attention."""
    batch = _on_cpu(make_batch([1, 3], [20, 9], num_q_heads=4, num_kv_heads=2, head_dim=32,
                               block_size=8, dtype=torch.float16))
    out = poisoned(batch.q.shape, torch.float16, CPU)
    cpu.paged_attention(*batch.args(), out, scale=0.2, **batch.bounds())
    assert rel_err(out, dense_attention(batch, 0.2, 0, 0.0)) < 2e-3  # float16 output rounding


def test_one_openmp_runtime_in_the_process() -> None:
    """paged_decode's OpenMP threads must be torch's: a second libgomp would bring a second pool
    of threads competing for the same cores."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("no /proc/self/maps here")
    torch.ones(4096).sum()  # torch's own parallel code has run (its libgomp is loaded)
    cpu.paged_attention  # noqa: B018
    assert cpu_attention.load("paged_decode")[0] is not None
    libs = {line.split()[-1] for line in maps.read_text().splitlines() if "gomp" in line}
    assert len(libs) <= 1, libs


# The default build takes the widest SIMD path the CPU has; these builds take the narrower ones, so
# every path is tested on a CPU that has it.
NARROWER_BUILDS = {"avx2": ("-mno-avx512f",), "portable": ("-mno-avx2", "-mno-avx512f")}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", sorted(NARROWER_BUILDS))
def test_narrower_simd_paths(monkeypatch, path, dtype) -> None:
    if path == "avx2" and "avx2" not in build.cpu_flags():
        pytest.skip("this CPU has no AVX2")
    lib, why = build.load("paged_decode", NARROWER_BUILDS[path])
    if lib is None:
        pytest.skip(why)
    monkeypatch.setattr(cpu_attention, "load", lambda name: (lib, ""))
    for num_q_heads, num_kv_heads, head_dim in [(12, 4, 64), (8, 1, 80), (4, 2, 128), (4, 2, 40)]:
        _check([1] * len(DECODE_LENS), DECODE_LENS, num_q_heads=num_q_heads,
               num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype)
    _check([1, 1, 4, 1, 1], [40, 33, 20, 5, 90], dtype=dtype, window=13, softcap=30.0)
    _check([1, 1, 1, 1], [2000, 17, 513, 256], dtype=dtype, window=700)  # long rows in parts
