"""kernels/cpu/quant_gemm.c's int8-activation path (quant_gemm_x8, quant_linear.ACT = "int8") on
every SIMD path this machine can run: AVX-512 VNNI (native here), AVX-VNNI on 256 bits
(-mno-avx512vnni, and -mno-avx512f), AVX2's vpmaddubsw (-mno-avx512f -mno-avxvnni) and the
portable C (-mno-avx2).

Against a plain-PyTorch twin that quantizes each row of x the same way (per block of xb inputs:
sx = amax / 127, q = round(x * (127 / amax)) in float32, ties to even) and multiplies in float64:
the kernel sums each block's q x code exactly in int32, so the two differ only by float32's
rounding of the scaling: per block, sx (scale dot + offset sum(q)) has its pieces rounded (2u) and
is added to y (one rounding), so with N blocks the kernel is within (N + 4) u S of the twin,
S = sum over blocks of sx (|scale dot| + |offset sum(q)|) + |bias|, u = 2^-24; the check allows
twice that. Against the unquantized x (the reference, dense weight): within the twin's bound plus
sum_i |w_i| |x_i - sx q_i| (the quantization error itself, exact in float64) plus the reference's
own float32 rounding; and the relative error stays under 1% on random data.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

from pagedserve.kernels import reference
from pagedserve.kernels.quantized import QuantizedWeight, quantize_rtn
from tests.kernels.common import broken_packings, require_cpu_kernel

ql = importlib.import_module("pagedserve.kernels.cpu.quant_linear")

# build flags -> (the x8 path they give, the CPU flags it needs to run)
PATHS = {(): ("", ""),
         ("-mno-avx512vnni",): ("avx-vnni", "avx512bw avx_vnni"),
         ("-mno-avx512f",): ("avx-vnni", "avx2 avx_vnni"),
         ("-mno-avx512f", "-mno-avxvnni"): ("avx2", "avx2"),
         ("-mno-avx2",): ("scalar", "")}
PORTABLE = ("-mno-avx2",)
ROWS = (1, 2, 3, 5, 8, 9, 16, 33)  # tiles of 8 (AVX-512) or 4 rows, and what is left over
# (out, in, groups): outputs not a multiple of a panel's 16; blocks of 32 (GGUF), 24 (group 48),
# 20 (groups 100, 300), 16, 12 and 4, chunks that do not end on a group, one group per row
SHAPES = ((37, 256, (16, 32, 128, 256)), (21, 576, (4, 48, 64, 576)), (19, 300, (12, 100, 300)))


def _cpu_flags() -> set[str]:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return set()
    return set(next((ln for ln in lines if ln.startswith("flags")), "").split())


@pytest.fixture(params=list(PATHS), ids=["native", "avx512-no-vnni", "avx-vnni", "avx2",
                                         "portable"])
def build(request, monkeypatch) -> str:
    """Each path's build of the kernel with ACT = "int8"; a path this CPU cannot run is skipped."""
    flags = request.param
    want, needs = PATHS[flags]
    missing = set(needs.split()) - _cpu_flags()
    if missing:
        pytest.skip(f"this CPU has no {' '.join(sorted(missing))}")
    require_cpu_kernel("quant_gemm")
    monkeypatch.setattr(ql, "BUILD_FLAGS", flags)
    monkeypatch.setattr(ql, "ACT", "int8")
    got = ql.path()
    assert got == want or (not want and got in ("avx512-vnni", "avx-vnni", "avx2", "scalar")), got
    return got


def x_block(group: int) -> int:
    """The kernel's block of x: the largest multiple of 4 up to 32 dividing the group."""
    b = 32
    while group % b:
        b -= 4
    return b


def quantize_rows(x: torch.Tensor, xb: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [m, blocks, xb], sx [m, blocks]) as the kernel computes them, in float32."""
    m, k = x.shape
    xf = x.float().reshape(m, k // xb, xb)
    amax = xf.abs().amax(-1)
    ok = amax >= 2.0**-100
    zero = torch.zeros(())
    # torch's `127 / t` is t.reciprocal() * 127, rounded twice: divide a tensor of 127 instead
    inv = torch.where(ok, torch.full_like(amax, 127) / amax, zero)
    q = torch.round(xf * inv[..., None])
    return q, torch.where(ok, amax / 127, zero)


def twin(x: torch.Tensor, weight: QuantizedWeight,
         bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, bound), float64: the kernel's result from the same int8 x without float32 rounding,
    and how far float32 rounding may take the kernel from it."""
    xb = x_block(weight.group)
    q, sx = quantize_rows(x, xb)
    q, sx = q.double(), sx.double()
    n, k = weight.shape
    codes = weight.q.double().reshape(n, k // xb, xb)
    dot = torch.einsum("mbi,nbi->mnb", q, codes)  # exact: integers below 2^53
    scale = weight.scale.double().repeat_interleave(weight.group // xb, dim=1)[None]
    terms = scale * dot
    size = terms.abs()
    if weight.offset is not None:
        offset = weight.offset.double().repeat_interleave(weight.group // xb, dim=1)[None]
        qsum = offset * q.sum(-1)[:, None, :]
        terms, size = terms + qsum, size + qsum.abs()
    b = 0 if bias is None else bias.double()
    y = (terms * sx[:, None, :]).sum(-1) + b
    s = (size * sx[:, None, :]).sum(-1) + (0 if bias is None else b.abs())
    return y, (k // xb + 4) * 2.0**-23 * s


def _call(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None,
          packed=None) -> torch.Tensor:
    got = ql.quant_linear(x, ql.pack_quantized(weight) if packed is None else packed, bias)
    assert got.dtype == x.dtype and got.shape == (*x.shape[:-1], weight.shape[0])
    return got


def check_twin(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None,
               packed=None) -> torch.Tensor:
    got = _call(x, weight, bias, packed)
    want, bound = twin(x, weight, bias)
    if x.dtype == torch.bfloat16:  # the result's own rounding
        bound = bound + 2.0**-8 * (want.abs() + bound)
    err = (got.double() - want).abs()
    assert (err <= bound).all(), f"worst excess {(err - bound).max():.3g}"
    return got


def _half_tables(weight: QuantizedWeight) -> QuantizedWeight:
    def rounded(t):
        return None if t is None else t.half().float()

    return QuantizedWeight(weight.q, rounded(weight.scale), rounded(weight.offset), weight.group,
                           weight.bits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "offset"])
@pytest.mark.parametrize("bits", [4, 8])
def test_within_float32_rounding_of_the_twin(build, bits, symmetric, dtype) -> None:
    for out_features, in_features, groups in SHAPES:
        w = torch.randn(out_features, in_features)
        bias = torch.randn(out_features)
        for group in groups:
            rtn = quantize_rtn(w, bits, group, symmetric)
            for weight in (rtn, _half_tables(rtn)):
                packed = ql.pack_quantized(weight)
                assert isinstance(packed, ql.PackedQuantWeight)
                for rows in ROWS:
                    x = torch.randn(rows, in_features).to(dtype)
                    check_twin(x, weight, bias if rows % 2 else None, packed)


@pytest.mark.parametrize("bits", [4, 8])
def test_within_the_quantization_error_of_the_reference(build, bits) -> None:
    """Against F.linear(x, the dense weight): the error of x's rounding to int8 bounds the
    difference, and on random data it is well under 1% of the result."""
    weight = quantize_rtn(torch.randn(48, 576), bits, 32, symmetric=False)
    x = torch.randn(9, 576) * torch.linspace(0.1, 10, 576)  # blocks of different scales
    got = _call(x, weight, None).double()
    want = reference.quant_linear(x, weight, None).double()
    q, sx = quantize_rows(x, 32)
    rounding = (x.double() - (q.double() * sx.double()[..., None]).reshape(x.shape)).abs()
    dense = weight.dequantize().double()
    bound = rounding @ dense.abs().T + twin(x, weight, None)[1]
    bound += (576 + 2) * 2.0**-24 * (x.double().abs() @ dense.abs().T)  # the reference's float32
    assert ((got - want).abs() <= bound).all()
    assert (got - want).norm() / want.norm() < 0.01


@pytest.mark.parametrize("bits", [4, 8])
def test_rows_are_independent_of_the_call(build, bits) -> None:
    """A row's bits depend on nothing but the row: alone, or anywhere in calls of 1 to 64 rows
    (and 130, three blocks of rows at 2100 outputs), float32 and bf16."""
    for out_features, group in ((40, 32), (2100, 64)):
        weight = quantize_rtn(torch.randn(out_features, 128), bits, group, symmetric=False)
        packed, bias = ql.pack_quantized(weight), torch.randn(out_features)
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(130, 128).to(dtype)
            whole = _call(x, weight, bias, packed)
            alone = torch.cat([_call(x[i:i + 1], weight, bias, packed) for i in range(64)])
            assert torch.equal(alone, whole[:64])
            for rows in range(1, 65):
                start = (rows * 7) % (130 - rows)
                assert torch.equal(_call(x[start:start + rows], weight, bias, packed),
                                   whole[start:start + rows]), rows


def test_the_batch_invariance_probe_needs_no_padding(build) -> None:
    """executor/batch_invariance.py's own probe: no floor of rows, on every path."""
    from pagedserve.executor.batch_invariance import probe_min_rows

    weight = quantize_rtn(torch.randn(40, 96), 4, 32, symmetric=False)
    packed, bias = ql.pack_quantized(weight), torch.randn(40)
    for dtype in (torch.float32, torch.bfloat16):
        assert probe_min_rows(lambda rows: _call(rows, weight, bias, packed), 96, dtype) == 1


@pytest.mark.parametrize("bits", [4, 8])
def test_every_path_gives_the_portable_bits(build, bits, monkeypatch) -> None:
    """The SIMD paths sum blocks exactly and scale them with the same float32 operations in the
    same order as the portable C, so all of them give the same bits."""
    flags = ql.BUILD_FLAGS
    for symmetric in (True, False):
        weight = quantize_rtn(torch.randn(37, 576), bits, 64, symmetric)
        for dtype in (torch.float32, torch.bfloat16):
            x, bias = torch.randn(11, 576).to(dtype), torch.randn(37)
            got = _call(x, weight, bias)
            monkeypatch.setattr(ql, "BUILD_FLAGS", PORTABLE)
            portable = _call(x, weight, bias)
            monkeypatch.setattr(ql, "BUILD_FLAGS", flags)
            assert torch.equal(got, portable)


def test_each_code_lands_on_its_output_and_input(build) -> None:
    """One code per output, at a different input each (every nibble and pair position): the
    output is that code's weight times that input, up to x's rounding to int8 (exact here:
    each block's largest |x| is the one input, so it quantizes to 127 sx exactly)."""
    for bits in (4, 8):
        out_features, in_features = 20, 64
        q = torch.zeros(out_features, in_features, dtype=torch.uint8 if bits == 4 else torch.int8)
        cols = torch.arange(out_features) * 7 % in_features
        q[torch.arange(out_features), cols] = torch.arange(out_features).to(q.dtype) % 13 + 1
        scale = torch.rand(out_features, 2) + 0.5
        weight = QuantizedWeight(q, scale, None, 32, bits)
        x = torch.zeros(out_features, in_features)
        x[torch.arange(out_features), cols] = torch.rand(out_features) + 0.5  # row i: input cols[i]
        got = _call(x, weight, None)
        w = q.float() * scale.repeat_interleave(32, dim=1)
        assert torch.allclose(got, x @ w.T, rtol=1e-6, atol=0)


def test_zero_tiny_and_non_finite_rows(build) -> None:
    """A zero row gives the bias; one below 2^-100 quantizes to zero; an inf or NaN makes its
    own row NaN and leaves the others' bits alone."""
    weight = quantize_rtn(torch.randn(24, 64), 4, 32, symmetric=False)
    packed, bias = ql.pack_quantized(weight), torch.randn(24)
    x = torch.randn(5, 64)
    clean = _call(x, weight, bias, packed)
    x[1] = 0
    x[2] = 1e-35
    x[3, 40] = float("inf")
    x[4, 3] = float("nan")
    got = _call(x, weight, bias, packed)
    assert torch.equal(got[1], bias) and torch.equal(got[2], bias)
    assert got[3].isnan().all() and got[4].isnan().all()
    assert torch.equal(got[0], clean[0])


def test_the_check_rejects_wrong_nibbles_or_a_lost_offset(build) -> None:
    """The twin's bound is tight enough to see a layout or offset mistake."""
    weight = quantize_rtn(torch.randn(32, 64), 4, 32, symmetric=False)
    packed = ql.pack_quantized(weight)
    x = torch.randn(5, 64)
    for wrong in broken_packings(packed):
        with pytest.raises(AssertionError):
            check_twin(x, weight, None, wrong)


def test_an_unknown_activation_setting_is_refused(monkeypatch) -> None:
    require_cpu_kernel("quant_gemm")
    monkeypatch.setattr(ql, "ACT", "int4")
    with pytest.raises(ValueError, match="PAGEDSERVE_QUANT_ACT"):
        ql.path()
