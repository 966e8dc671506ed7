"""kernels/cpu/quant_gemm.c (int8 / int4 weight-only GEMM) against kernels.reference.quant_linear,
on every SIMD path this machine can run: AVX-512 with BF16 (native here), AVX-512 without it
(-mno-avx512bf16: bf16 x widened to float32), AVX2 (-mno-avx512f) and the portable C (-mno-avx2).
These are the float-x path (quant_linear.ACT = "float"); the int8-x paths have their own tests
(test_cpu_quant_int8_act.py).

The bound: the kernel sums each product x q exactly (bf16 x) or rounded once (float32), over
K terms in float32, then scales once and adds the offset term once per group; the reference
rounds each dequantised weight once and sums K products in float32. Each is within (K + 2) u S of
the exact value, S = sum_i |x_i| (|s q_i| + |o|) + |bias|, u = 2^-24, so they differ by at most
(K + 4) 2^-23 S. A bf16 result adds its own rounding, 2^-8 of its size.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

from pagedserve.kernels import reference
from pagedserve.kernels.cpu.build import cpu_flags
from pagedserve.kernels.quantized import QuantizedWeight, quantize_rtn
from tests.kernels.common import broken_packings, require_cpu_kernel

ql = importlib.import_module("pagedserve.kernels.cpu.quant_linear")  # the package's attribute
# of that name is the function

# build flags -> (the path they give, what the CPU needs to run it); () is the native build
PATHS = {(): ("", ""), ("-mno-avx512bf16",): ("avx512", "avx512bw"),
         ("-mno-avx512f",): ("avx2", "avx2"), ("-mno-avx2",): ("scalar", "")}
ROWS = (1, 2, 4, 7, 16, 33, 130)  # 1-4: codes converted as they stream; more: through a buffer
# (out, in, groups): outputs not a multiple of the 16 of a panel; groups down to GGUF's 16, up
# to one per row, and longer than the kernel's 256-k chunk without dividing into it
SHAPES = ((37, 256, (16, 32, 128, 256)), (21, 576, (64, 192, 576)))


@pytest.fixture(params=list(PATHS), ids=["native", "avx512", "avx2", "portable"])
def build(request, monkeypatch) -> str:
    """Each path's build of the kernel; a path this CPU cannot execute is skipped."""
    flags = request.param
    want, needs = PATHS[flags]
    cpu = cpu_flags()
    if needs and needs not in cpu:
        pytest.skip(f"this CPU has no {needs}")
    require_cpu_kernel("quant_gemm")
    monkeypatch.setattr(ql, "BUILD_FLAGS", flags)
    monkeypatch.setattr(ql, "ACT", "float")
    got = ql.path()
    if flags == () and "avx512_bf16" in cpu:
        want = "avx512-bf16"
    assert got == want or not want, got
    return got


def _half_tables(weight: QuantizedWeight) -> QuantizedWeight:
    """The weight with its scales and offsets rounded to float16, as a GGUF file holds them:
    packed as float16."""
    def rounded(t):
        return None if t is None else t.half().float()

    return QuantizedWeight(weight.q, rounded(weight.scale), rounded(weight.offset), weight.group,
                           weight.bits)


def _is_half(weight: QuantizedWeight) -> bool:
    return all(torch.equal(t.half().float(), t) for t in (weight.scale, weight.offset)
               if t is not None)


def _bound(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """(K + 4) 2^-23 S, S as in the module's docstring, in float64."""
    scale = weight.scale.double().repeat_interleave(weight.group, dim=1)
    size = weight.q.double().abs() * scale.abs()
    if weight.offset is not None:
        size += weight.offset.double().abs().repeat_interleave(weight.group, dim=1)
    s = x.double().abs() @ size.T + (0 if bias is None else bias.double().abs())
    return (x.shape[-1] + 4) * 2.0**-23 * s


def check(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None,
          packed=None) -> None:
    """quant_linear through the packed weight agrees with the reference within the bound."""
    got = ql.quant_linear(x, ql.pack_quantized(weight) if packed is None else packed, bias)
    assert got.dtype == x.dtype and got.shape == (*x.shape[:-1], weight.shape[0])
    want = reference.quant_linear(x.float(), weight, bias).double()  # before rounding to x's
    bound = _bound(x.float(), weight, bias)
    if x.dtype == torch.bfloat16:
        bound = bound + 2.0**-8 * (want.abs() + bound)
    err = (got.double() - want).abs()
    assert (err <= bound).all(), f"worst excess {(err - bound).max():.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "offset"])
@pytest.mark.parametrize("bits", [4, 8])
def test_within_float32_rounding_of_the_reference(build, bits, symmetric, dtype) -> None:
    for out_features, in_features, groups in SHAPES:
        w = torch.randn(out_features, in_features)
        bias = torch.randn(out_features)
        for group in groups:
            weights = [quantize_rtn(w, bits, group, symmetric)]
            if group in (groups[0], groups[-1]):  # the float16 tables, at the two ends
                weights.append(_half_tables(weights[0]))
            for weight in weights:
                packed = ql.pack_quantized(weight)
                assert isinstance(packed, ql.PackedQuantWeight)
                assert packed.scales.dtype == (torch.float16 if _is_half(weight) else torch.float32)
                for rows in ROWS:
                    x = torch.randn(rows, in_features).to(dtype)
                    check(x, weight, bias if rows % 2 else None, packed)


@pytest.mark.parametrize("bits", [4, 8])
def test_rows_in_several_blocks(build, bits) -> None:
    """Many rows of a wide output go through in blocks of 64+ rows (their outputs kept in L2):
    130 rows of 2100 outputs make three, the last of 2 rows (a decode-sized tile)."""
    weight = quantize_rtn(torch.randn(2100, 64), bits, 32, symmetric=False)
    for dtype in (torch.float32, torch.bfloat16):
        check(torch.randn(130, 64).to(dtype), weight, torch.randn(2100))


@pytest.mark.parametrize("bits", [4, 8])
def test_each_code_lands_on_its_output_and_input(build, bits) -> None:
    """One code per output at a different input each (every nibble and pair position): the
    output is that code's weight times that input. A swapped nibble or pair reads another x."""
    out_features, in_features = 20, 32
    q = torch.zeros(out_features, in_features, dtype=torch.uint8 if bits == 4 else torch.int8)
    cols = torch.arange(out_features) * 7 % in_features
    q[torch.arange(out_features), cols] = torch.arange(out_features).to(q.dtype) % 13 + 1
    scale = torch.rand(out_features, 2) + 0.5
    offset = torch.randn(out_features, 2)
    weight = QuantizedWeight(q, scale, offset, 16, bits)
    x = torch.randn(3, in_features)
    check(x, weight, None)
    wsum = offset.repeat_interleave(16, dim=1)
    want = (q.float() * scale[torch.arange(out_features), cols // 16][:, None] + wsum)
    assert torch.allclose(ql.quant_linear(x, ql.pack_quantized(weight), None), x @ want.T,
                          rtol=1e-5, atol=1e-5)


def test_the_check_rejects_wrong_nibbles_or_a_lost_offset(build) -> None:
    """The bound is tight enough to see a layout or offset mistake."""
    weight = quantize_rtn(torch.randn(32, 64), 4, 32, symmetric=False)
    packed = ql.pack_quantized(weight)
    x = torch.randn(5, 64)
    for wrong in broken_packings(packed):
        with pytest.raises(AssertionError):
            check(x, weight, None, wrong)


def test_leading_dims_strided_rows_float16_and_no_rows(build) -> None:
    weight = quantize_rtn(torch.randn(24, 64), 8, 32, symmetric=False)
    check(torch.randn(2, 3, 64), weight, None)
    check(torch.randn(5, 128)[:, ::2], weight, torch.randn(24))
    check(torch.randn(5, 100)[:, 10:74].bfloat16(), weight, None)
    x16 = torch.randn(4, 64).half()
    got = ql.quant_linear(x16, ql.pack_quantized(weight), None)
    assert got.dtype == torch.float16
    assert torch.allclose(got.float(), reference.quant_linear(x16.float(), weight, None),
                          rtol=2e-3, atol=2e-3)
    assert ql.quant_linear(torch.randn(0, 64), ql.pack_quantized(weight), None).shape == (0, 24)


def test_what_the_kernel_cannot_take_goes_to_the_reference(build) -> None:
    """A group that is not a multiple of 4, or int4 codes a nibble cannot hold: the shared form
    is kept, and the reference's own answer comes back."""
    odd = quantize_rtn(torch.randn(8, 18), 4, 6, symmetric=True)
    big = QuantizedWeight(torch.full((8, 16), 20, dtype=torch.uint8), torch.ones(8, 1), None, 16, 4)
    for weight in (odd, big):
        assert ql.pack_quantized(weight) is weight
        x = torch.randn(3, weight.shape[1])
        assert torch.equal(ql.quant_linear(x, ql.pack_quantized(weight), None),
                           reference.quant_linear(x, weight, None))


def test_the_cpu_backend_exports_this_kernel() -> None:
    from pagedserve.kernels import cpu

    assert cpu.quant_linear is ql.quant_linear and cpu.pack_quantized is ql.pack_quantized


@pytest.mark.parametrize("bits", [4, 8])
def test_a_result_does_not_depend_on_the_thread_count(build, bits) -> None:
    """The threads share the panels out between them (quant_gemm.c's all_panels: guided shares),
    but each panel is one thread's from end to end: every output is summed in one order, so one
    thread and two give the same bits, at decode and prompt row counts."""
    if (os.cpu_count() or 1) < 2:
        pytest.skip("one CPU: one thread only")
    weight = quantize_rtn(torch.randn(1000, 576), bits, 32, symmetric=False)  # 63 panels, odd
    packed = ql.pack_quantized(weight)
    xs = [torch.randn(rows, 576).to(dtype) for rows in (1, 9, 130)
          for dtype in (torch.float32, torch.bfloat16)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [ql.quant_linear(x, packed, None) for x in xs]
        torch.set_num_threads(2)
        two = [ql.quant_linear(x, packed, None) for x in xs]
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two):
        assert torch.equal(a, b)
