"""kernels/cpu/panel_gemm.c (float32 GEMMs through weight panels) against a float64 product:
every tile height, prompt-sized row counts over several blocks of x, partial panels, strided rows,
bias; bf16 panels for weights whose values are all bf16, bit for bit the float32 panels' result."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from pagedserve.kernels.cpu import panel_gemm
from tests.kernels.common import require_cpu_kernel


@pytest.fixture(autouse=True)
def built(panel_gemm_path) -> None:
    require_cpu_kernel("panel_gemm")


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Within the bound on summing K float32 products in any order: K u sum(|terms|)."""
    got = panel_gemm.linear(x, panel_gemm.pack(weight), weight.shape[0], bias)
    exact = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    size = F.linear(x.abs().double(), weight.abs().double(),
                    None if bias is None else bias.abs().double())
    assert got.shape == exact.shape and got.dtype == torch.float32
    assert ((got.double() - exact).abs() <= (x.shape[1] + 1) * 2.0**-24 * size).all()


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 13, 24, 48])  # every tile height, mixes,
# and 2-4 passes (those prefetch the next panel)
@pytest.mark.parametrize(("out_features", "in_features"), [(96, 64), (300, 768), (5, 7)])
def test_within_float32_rounding_of_float64(rows, out_features, in_features) -> None:
    weight = torch.randn(out_features, in_features)
    assert panel_gemm.pack(weight).dtype == torch.float32
    _check(torch.randn(rows, in_features), weight, None)
    _check(torch.randn(rows, in_features), weight, torch.randn(out_features))


@pytest.mark.parametrize("rows", [1, 5, 6, 7, 13, 24, 48])
@pytest.mark.parametrize(("out_features", "in_features"), [(96, 64), (300, 768), (5, 7)])
def test_bf16_panels_give_the_float32_panels_result(rows, out_features, in_features) -> None:
    """A weight of bf16 values (a bf16 checkpoint run in float32) goes into bf16 panels, and the
    tile widens them exactly: the same sums in the same order as float32 panels of it."""
    weight = torch.randn(out_features, in_features).bfloat16().float()
    narrow, wide = panel_gemm.pack(weight), panel_gemm.pack(weight, allow_bf16=False)
    assert narrow.dtype == torch.bfloat16 and wide.dtype == torch.float32
    assert narrow.numel() == wide.numel() and narrow.element_size() * 2 == wide.element_size()
    x, bias = torch.randn(rows, in_features), torch.randn(out_features)
    for b in (None, bias):
        got = panel_gemm.linear(x, narrow, out_features, b)
        assert torch.equal(got, panel_gemm.linear(x, wide, out_features, b))
    _check(x, weight, bias)


def test_rows_over_several_blocks_of_x() -> None:
    """x goes through in blocks of 8 MiB of rows (512 rows of 4096 here): 1100 rows make two
    whole blocks and a ragged third, strided rows included."""
    weight = torch.randn(40, 4096)
    _check(torch.randn(1100, 4096), weight, torch.randn(40))
    _check(torch.randn(1100, 4200)[:, 50:4146], weight, None)
    narrow = weight.bfloat16().float()
    x = torch.randn(1100, 4096)
    assert torch.equal(panel_gemm.linear(x, panel_gemm.pack(narrow), 40, None),
                       panel_gemm.linear(x, panel_gemm.pack(narrow, allow_bf16=False), 40, None))


def test_a_weight_not_all_bf16_keeps_float32_panels() -> None:
    weight = torch.randn(32, 16).bfloat16().float()
    weight[3, 5] = 1.0 + 2.0**-12  # between two bf16 values (their spacing at 1 is 2**-7)
    assert panel_gemm.pack(weight).dtype == torch.float32
    weight[3, 5] = float("nan")
    assert panel_gemm.pack(weight).dtype == torch.float32


def test_strided_rows_columns_and_bias() -> None:
    weight = torch.randn(40, 64)
    _check(torch.randn(9, 100)[:, 10:74], weight, None)
    _check(torch.randn(9, 128)[:, ::2], weight, None)  # strided columns: copied first
    _check(torch.randn(9, 64), weight, torch.randn(80)[::2])  # a strided bias: copied first


def test_other_dtypes_are_not_packed() -> None:
    assert panel_gemm.pack(torch.randn(8, 8).bfloat16()) is None
    assert panel_gemm.pack(torch.randn(8, 8, device="meta")) is None


def test_a_result_does_not_depend_on_the_thread_count() -> None:
    """Each panel is one thread's from end to end (guided shares of the panels), so one thread
    and two sum every output in the same order: the same bits, at decode and prompt row counts."""
    if (os.cpu_count() or 1) < 2:
        pytest.skip("one CPU: one thread only")
    weight = torch.randn(1000, 576)  # 63 panels, the last one partial
    panels = panel_gemm.pack(weight)
    xs = [torch.randn(rows, 576) for rows in (1, 9, 130)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [panel_gemm.linear(x, panels, 1000, None) for x in xs]
        torch.set_num_threads(2)
        two = [panel_gemm.linear(x, panels, 1000, None) for x in xs]
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two):
        assert torch.equal(a, b)
