"""kernels/cpu/quant_gemm.c's int8-activation paths, one pass (quant_gemm_x8, quant_linear.ACT =
"int8") and two (quant_gemm_x8x2, "int8x2"), on every SIMD path this machine can run: AVX-512
VNNI (native here), AVX-VNNI on 256 bits (-mno-avx512vnni, and -mno-avx512f), AVX2's vpmaddubsw
(-mno-avx512f -mno-avxvnni) and the portable C (-mno-avx2).

Against a plain-PyTorch twin that quantizes each row of x the same way (per block of xb inputs:
sx = amax / L, Q = round(x * (L / amax)) in float32, ties to even; L = 127 with one pass, 32512
with two, where Q is written 255 q1 + q2, two int8 planes) and multiplies x as those planes say,
s1 q1 + s2 q2 (s2 = sx, s1 = 255 sx), by the dequantized weight in float64: the kernel sums each
block's Q x code exactly in int32, so the two differ only by float32's rounding of the scaling:
per block, sx (scale dot + offset sum(Q)) has its pieces rounded (3u: dot itself is rounded to
float32 once it passes 2^24) and is added to y (one rounding), so with N blocks the kernel is
within (N + 4) 2u S of the twin, S = sum over blocks of sx (|scale dot| + |offset sum(Q)|) +
|bias|, u = 2^-24. Against the unquantized x (the reference, dense weight): within the twin's
bound plus sum_i |w_i| |x_i - sx Q_i| (the quantization error itself, exact in float64) plus the
reference's own float32 rounding. And measured against what rounding x to bf16 would cost the
float path (the engine's activations are bf16 on this CPU): two passes err a hundredth of it on
random data and a few times it where one value is 500x its block's others; one pass errs 3x and
hundreds of times it.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from pagedserve.kernels import reference
from pagedserve.kernels.cpu.build import cpu_flags
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


PASSES = {"int8": 1, "int8x2": 2}  # ACT -> int8 planes of x
LEVELS = {1: 127, 2: 32512}  # L: |Q| <= L; 32512 = 127 x 256 = 255 x 127 + 127


@pytest.fixture(params=list(PASSES))
def act(request, monkeypatch) -> str:
    monkeypatch.setattr(ql, "ACT", request.param)
    return request.param


@pytest.fixture(params=list(PATHS), ids=["native", "avx512-no-vnni", "avx-vnni", "avx2",
                                         "portable"])
def build(request, act, monkeypatch) -> str:
    """Each path's build of the kernel with ACT = act; a path this CPU cannot run is skipped."""
    flags = request.param
    want, needs = PATHS[flags]
    missing = set(needs.split()) - cpu_flags()
    if missing:
        pytest.skip(f"this CPU has no {' '.join(sorted(missing))}")
    require_cpu_kernel("quant_gemm")
    monkeypatch.setattr(ql, "BUILD_FLAGS", flags)
    got = ql.path()
    assert got == want or (not want and got in ("avx512-vnni", "avx-vnni", "avx2", "scalar")), got
    return got


def x_block(group: int) -> int:
    """The kernel's block of x: the largest multiple of 4 up to 32 dividing the group."""
    b = 32
    while group % b:
        b -= 4
    return b


def quantize_rows(x: torch.Tensor, xb: int, passes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q [m, blocks, xb], sx [m, blocks]) as the kernel computes them, in float32."""
    m, k = x.shape
    xf = x.float().reshape(m, k // xb, xb)
    amax = xf.abs().amax(-1)
    ok = amax >= 2.0**-100
    zero = torch.zeros(())
    # torch's `L / t` is t.reciprocal() * L, rounded twice: divide a tensor of L instead
    inv = torch.where(ok, torch.full_like(amax, LEVELS[passes]) / amax, zero)
    q = torch.round(xf * inv[..., None])
    return q, torch.where(ok, amax / LEVELS[passes], zero)


def planes(q: torch.Tensor, passes: int) -> list[torch.Tensor]:
    """Q as the kernel's int8 planes: [q] (one pass) or [q1, q2], Q = 255 q1 + q2."""
    if passes == 1:
        return [q]
    q1 = torch.round(q.double() / 255)  # never a tie: 255 is odd
    q2 = q.double() - 255 * q1
    assert q1.abs().max() <= 127 and q2.abs().max() <= 127
    return [q1, q2]


def dequantized_x(x: torch.Tensor, xb: int, passes: int) -> torch.Tensor:
    """x as the kernel multiplies it, float64: s1 q1 + s2 q2 (or sx q), s2 = sx, s1 = 255 sx."""
    q, sx = quantize_rows(x, xb, passes)
    sx = sx.double()[..., None]
    parts = planes(q, passes)
    xq = parts[0] * sx if passes == 1 else parts[0] * (255 * sx) + parts[1] * sx
    return xq.reshape(x.shape)


def dense64(weight: QuantizedWeight) -> torch.Tensor:
    """The dequantized weight in float64, exact (dequantize() rounds it to float32)."""
    scale = weight.scale.double().repeat_interleave(weight.group, dim=1)
    offset = 0 if weight.offset is None else weight.offset.double().repeat_interleave(weight.group, dim=1)
    return weight.q.double() * scale + offset


def twin(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None,
         passes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, bound), float64: the kernel's result from the same quantized x without float32
    rounding (x's planes times the dequantized weight), and how far float32 rounding may take
    the kernel from it."""
    xb = x_block(weight.group)
    q, sx = quantize_rows(x, xb, passes)
    q, sx = q.double(), sx.double()
    n, k = weight.shape
    b = 0 if bias is None else bias.double()
    y = dequantized_x(x, xb, passes) @ dense64(weight).T + b
    codes = weight.q.double().reshape(n, k // xb, xb)
    size = torch.einsum("mbi,nbi->mnb", q, codes).abs()  # exact: integers below 2^53
    size = size * weight.scale.double().repeat_interleave(weight.group // xb, dim=1)[None].abs()
    if weight.offset is not None:
        offset = weight.offset.double().repeat_interleave(weight.group // xb, dim=1)[None]
        size = size + (offset * q.sum(-1)[:, None, :]).abs()
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
    want, bound = twin(x, weight, bias, PASSES[ql.ACT])
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


def _outliers(x: torch.Tensor) -> torch.Tensor:
    """x with the first input of every block of 32 replaced by +-500: 500x the others' scale."""
    x = x.clone()
    x[:, ::32] = 500 * torch.sign(torch.randn(x.shape[0], x.shape[1] // 32))
    return x


@pytest.mark.parametrize("outliers", [False, True], ids=["random", "outliers"])
@pytest.mark.parametrize("bits", [4, 8])
def test_within_the_quantization_error_of_the_reference(build, act, bits, outliers) -> None:
    """Against F.linear(x, the dense weight): the error of x's rounding to integers bounds the
    difference (|x - sx Q| <= sx / 2, and 3 2^-24 |x| of float32's roundings of L / amax,
    amax / L and x L / amax); measured in the norm, two passes
    err under a tenth of what bf16's rounding of x costs the float path on random data (about a
    hundredth) and under 8x it with outliers (each small value keeps 500 / 65024 of the others'
    scale, ~2^-7, against bf16's 2^-9 to 2^-8 of itself), one pass under 10x and 1000x."""
    weight = quantize_rtn(torch.randn(48, 576), bits, 32, symmetric=False)
    x = torch.randn(9, 576) * torch.linspace(0.1, 10, 576)  # blocks of different scales
    x = _outliers(x) if outliers else x
    passes = PASSES[act]
    got = _call(x, weight, None).double()
    want = reference.quant_linear(x, weight, None).double()
    _, sx = quantize_rows(x, 32, passes)
    rounding = (x.double() - dequantized_x(x, 32, passes)).abs()
    per_value = sx.double().repeat_interleave(32, dim=1) / 2 + 2.0**-22 * x.double().abs()
    assert (rounding <= per_value).all()
    dense = dense64(weight)
    bound = rounding @ dense.abs().T + twin(x, weight, None, passes)[1]
    bound += (576 + 2) * 2.0**-24 * (x.double().abs() @ dense.abs().T)  # the reference's float32
    assert ((got - want).abs() <= bound).all()
    exact = x.double() @ dense.T
    bf16 = (x.bfloat16().double() @ dense.T - exact).norm()
    ratio = (got - exact).norm() / bf16
    assert ratio < {(1, False): 10, (1, True): 1000, (2, False): 0.1, (2, True): 8}[passes, outliers]


def test_two_passes_are_below_bf16_and_one_pass_is_not(build, act, monkeypatch) -> None:
    """bf16 x and result, outliers: two passes give the float path's own bf16 results but for
    a last bit in a few percent of them (their error is far below a bf16 step of the result,
    or of the row's rms where a result nearly cancels); one pass moves most results, by steps."""
    weight = quantize_rtn(torch.randn(64, 576), 4, 32, symmetric=False)
    x = _outliers(torch.randn(16, 576)).bfloat16()
    got = _call(x, weight, None).float()
    with monkeypatch.context() as m:
        m.setattr(ql, "ACT", "float")
        want = _call(x, weight, None).float()
    size = torch.maximum(want.abs(), want.pow(2).mean(1, keepdim=True).sqrt())
    steps = ((got - want).abs() / 2.0 ** (torch.floor(torch.log2(size)) - 7)).max()
    moved = (got != want).float().mean()
    if act == "int8x2":
        assert steps <= 1 and moved < 0.1, (steps, moved)
    else:
        assert steps > 2 and moved > 0.5, (steps, moved)


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
    output is that code's weight times that input, up to x's rounding to integers (exact here:
    each block's largest |x| is the one input, so it quantizes to L sx exactly)."""
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


def test_unset_the_activation_path_is_float_unless_bf16_products_are_the_slow_path(
        monkeypatch) -> None:
    from pagedserve.kernels.cpu import panel_gemm512

    require_cpu_kernel("quant_gemm")
    monkeypatch.setattr(ql, "ACT", "")
    for dtype in (torch.float32, torch.float16):  # FMA tiles already, finer than int8x2
        assert ql.act(dtype) == "float"
    slow_bf16 = panel_gemm512.preferred() and "avx512_vnni" in cpu_flags()
    assert ql.act(torch.bfloat16) == ("int8x2" if slow_bf16 else "float")
    # the probe decides: a CPU where vdpbf16ps were fast keeps float, whatever its VNNI
    ql.default_act.cache_clear()
    monkeypatch.setattr(panel_gemm512, "preferred", lambda: False)
    try:
        assert ql.act(torch.bfloat16) == "float"
    finally:
        ql.default_act.cache_clear()
    monkeypatch.setattr(ql, "ACT", "int8")  # a setting wins, for every dtype
    assert ql.act(torch.float32) == ql.act(torch.bfloat16) == "int8"
