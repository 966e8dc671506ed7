"""panel_gemm512 (bf16 weights, float32 FMAs on AVX-512) against its plain-PyTorch twin: each
output the float32 sum of its K products in order, plus the bias, rounded to bf16 once. A bf16 x
bf16 product is exact in float32, so a multiply then an add rounds as the kernel's FMA does and
the two agree bit for bit."""

from __future__ import annotations

import pytest
import torch

from pagedserve.executor.batch_invariance import probe_min_rows
from pagedserve.kernels.cpu import panel_gemm512

pytestmark = pytest.mark.skipif(not panel_gemm512.available(), reason="needs AVX-512")


def twin(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    acc = torch.zeros(x.shape[0], weight.shape[0])
    for kk in range(x.shape[1]):
        acc = acc + x[:, kk, None].float() * weight[:, kk].float()
    if bias is not None:
        acc = acc + bias.float()
    return acc.to(torch.bfloat16)


@pytest.mark.parametrize("rows", [1, 5, 12, 13, 30])
@pytest.mark.parametrize("n", [1, 31, 32, 33, 70])
def test_matches_the_in_order_float32_twin(rows: int, n: int) -> None:
    g = torch.Generator().manual_seed(rows * 100 + n)
    k = 37
    weight = torch.randn(n, k, generator=g).bfloat16()
    x = torch.randn(rows, k, generator=g).bfloat16()
    bias = torch.randn(n, generator=g).bfloat16()
    panels = panel_gemm512.pack(weight)
    for b in (None, bias):
        assert torch.equal(panel_gemm512.linear(x, panels, n, b), twin(x, weight, b))


def test_strided_input_and_a_long_sum() -> None:
    g = torch.Generator().manual_seed(7)
    weight = torch.randn(64, 512, generator=g).bfloat16()
    x = torch.randn(14, 1024, generator=g).bfloat16()[:, ::2]
    assert torch.equal(panel_gemm512.linear(x, panel_gemm512.pack(weight), 64, None),
                       twin(x, weight, None))


def test_rounds_ties_to_even_and_keeps_nan() -> None:
    # 1 + 2^-8 lies halfway between two bf16 values: even rounds down to 1; 1 + 3 * 2^-8 up
    weight = torch.tensor([[1.0, 2.0**-8], [1.0, 3 * 2.0**-8], [1.0, float("nan")]]).bfloat16()
    x = torch.ones(1, 2).bfloat16()
    got = panel_gemm512.linear(x, panel_gemm512.pack(weight), 3, None)
    assert got[0, 0].item() == 1.0
    assert got[0, 1].item() == 1.0 + 2.0**-6
    assert torch.isnan(got[0, 2])


def test_probe_reports_both_rates() -> None:
    lib = panel_gemm512._lib()
    assert lib.panel_gemm512_fma_gflops() > 1
    assert isinstance(panel_gemm512.preferred(), bool)


def test_a_row_does_not_depend_on_the_rows_beside_it() -> None:
    """Every output is the same in-order sum in a tile of 1 row or 12: batch-invariant with no
    row floor (executor/batch_invariance.py's probe)."""
    weight = torch.randn(70, 256, generator=torch.Generator().manual_seed(3)).bfloat16()
    panels = panel_gemm512.pack(weight)
    assert probe_min_rows(lambda x: panel_gemm512.linear(x, panels, 70, None), 256,
                          torch.bfloat16) == 1


def test_a_cpu_without_avx512_builds_it_and_never_takes_it(monkeypatch) -> None:
    monkeypatch.setattr(panel_gemm512, "BUILD_FLAGS", ("-mno-avx512f",))
    monkeypatch.setattr(panel_gemm512, "preferred", panel_gemm512.preferred.__wrapped__)
    assert panel_gemm512._lib() is not None
    assert not panel_gemm512.available()
    assert not panel_gemm512.preferred()
    assert panel_gemm512.pack(torch.randn(4, 4).bfloat16()) is None


def test_a_cpu_with_amx_keeps_onednn(monkeypatch, tmp_path) -> None:
    """oneDNN runs bf16 on AMX tiles where the CPU has them: the pairs are never preferred
    there, whatever the two instructions' rates."""
    monkeypatch.setattr(panel_gemm512, "_has_amx", lambda: True)
    assert not panel_gemm512.preferred.__wrapped__()


def test_the_first_probe_on_a_machine_is_recorded_and_later_processes_read_it(
        monkeypatch, tmp_path) -> None:
    """Every process on one CPU makes the same choice: a noisy probe in a restarted executor
    cannot switch its GEMMs (and so its bits) from the first process's."""
    monkeypatch.setenv("PAGEDSERVE_CACHE", str(tmp_path))
    monkeypatch.setattr(panel_gemm512, "_has_amx", lambda: False)
    record = panel_gemm512._decision_file()
    assert record.is_relative_to(tmp_path) and not record.exists()
    for answer in (True, False):
        record.unlink(missing_ok=True)
        monkeypatch.setattr(panel_gemm512, "_probe", lambda answer=answer: answer)
        assert panel_gemm512.preferred.__wrapped__() is answer  # probed, then recorded
        assert record.read_text() == ("1" if answer else "0")

        def noisy() -> bool:
            raise AssertionError("a recorded answer is not probed again")
        monkeypatch.setattr(panel_gemm512, "_probe", noisy)
        assert panel_gemm512.preferred.__wrapped__() is answer
    assert [p.name for p in record.parent.iterdir()] == [record.name]  # no temporary left
