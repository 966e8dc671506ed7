"""kernels/triton/quant_linear.py (W8A16 / W4A16) against kernels.reference.quant_linear: on CUDA
when there is a GPU, else through the Triton interpreter at small sizes (fp32 and fp16: the
interpreter's bf16 tl.dot is wrong, see /work/shared/NOTES.md).

The bound is the CPU kernel's (tests/kernels/test_cpu_quant_linear.py): exact products of x and
the codes, float32 sums in another order, the scale and offset once per group: within
(K + 4) 2^-23 S of the reference before rounding, S = sum |x| (|s q| + |o|) + |bias|; a 16-bit
result adds its own rounding (2^-8 of its size for bf16, 2^-11 for fp16).
"""

from __future__ import annotations

import importlib

import pytest
import torch

from pagedserve.kernels import reference
from pagedserve.kernels.quantized import QuantizedWeight, quantize_rtn
from tests.kernels.common import DEVICE, DTYPES

ROUNDING = {torch.float32: 0.0, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


@pytest.fixture
def tq(tk):
    """The module, imported after TRITON_INTERPRET is in place (the package's attribute of this
    name is the function)."""
    return importlib.import_module("pagedserve.kernels.triton.quant_linear")


def _on_device(weight: QuantizedWeight) -> QuantizedWeight:
    return QuantizedWeight(*(None if t is None else t.to(DEVICE) for t in
                             (weight.q, weight.scale, weight.offset)), weight.group, weight.bits)


def _check(tq, x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None) -> None:
    packed = tq.pack_quantized(_on_device(weight))
    assert isinstance(packed, tq.TritonQuantWeight)
    got = tq.quant_linear(x.to(DEVICE), packed, None if bias is None else bias.to(DEVICE)).cpu()
    assert got.dtype == x.dtype and got.shape == (x.shape[0], weight.shape[0])
    want = reference.quant_linear(x.float(), weight, bias).double()
    scale = weight.scale.double().repeat_interleave(weight.group, dim=1)
    size = weight.q.double().abs() * scale.abs()
    if weight.offset is not None:
        size += weight.offset.double().abs().repeat_interleave(weight.group, dim=1)
    s = x.double().abs() @ size.T + (0 if bias is None else bias.double().abs())
    bound = (x.shape[1] + 4) * 2.0**-23 * s
    bound = bound + ROUNDING[x.dtype] * (want.abs() + bound)
    err = (got.double() - want).abs()
    assert (err <= bound).all(), f"worst excess {(err - bound).max():.3g}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("bits", "symmetric"), [(8, True), (8, False), (4, True), (4, False)])
@pytest.mark.parametrize(("rows", "out_features", "in_features", "group"),
                         [(1, 40, 64, 32), (5, 70, 128, 64), (17, 24, 128, 128), (3, 16, 96, 32)])
def test_matches_the_reference(tq, dtype, bits, symmetric, rows, out_features, in_features,
                               group) -> None:
    weight = quantize_rtn(torch.randn(out_features, in_features), bits, group, symmetric)
    x = torch.randn(rows, in_features).to(dtype)
    _check(tq, x, weight, torch.randn(out_features) if rows % 2 else None)


def test_int8_groups_of_16(tq) -> None:
    _check(tq, torch.randn(3, 48), quantize_rtn(torch.randn(20, 48), 8, 16, symmetric=False), None)


def test_swapped_nibbles_are_caught(tq) -> None:
    """The bound is tight enough to see the two halves of an int4 tile read the wrong way."""
    weight = quantize_rtn(torch.randn(24, 64), 4, 32, symmetric=False)
    packed = tq.pack_quantized(_on_device(weight))
    swapped = (packed.codes >> 4) | ((packed.codes & 15) << 4)
    wrong = tq.TritonQuantWeight(**{**vars(packed), "codes": swapped})
    x = torch.randn(3, 64)
    got = tq.quant_linear(x.to(DEVICE), wrong, None).cpu()
    assert (got - reference.quant_linear(x, weight, None)).abs().max() > 1e-2


def test_what_the_kernel_cannot_take_goes_to_the_reference(tq) -> None:
    """int4 groups of 16 (halves under tl.dot's 16), groups of 8, int4 codes over 15."""
    cases = [quantize_rtn(torch.randn(8, 32), 4, 16, symmetric=True),
             quantize_rtn(torch.randn(8, 32), 8, 8, symmetric=True),
             QuantizedWeight(torch.full((8, 32), 20, dtype=torch.uint8), torch.ones(8, 1), None,
                             32, 4)]
    for weight in cases:
        assert tq.pack_quantized(weight) is weight
        x = torch.randn(2, 32)
        assert torch.equal(tq.quant_linear(x, weight, None), reference.quant_linear(x, weight, None))
