"""bench/kernels.py through the interpreter at tiny sizes: the compile accounting the GPU run
reports, and the tile sweep's --sweep path, end to end (timings themselves mean nothing here)."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = [pytest.mark.triton,
              pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU script runs these")]


def test_benchmark_reports_no_compiles_after_warmup(tk, monkeypatch) -> None:
    from pagedserve.bench import kernels as bench

    shapes = {**bench.CPU_SHAPES, "decode_batches": (1, 2), "decode_contexts": (40,),
              "prefill": ((1, 20),)}
    monkeypatch.setattr(bench, "CPU_SHAPES", shapes)
    result = bench.run_benchmarks(torch, False, torch.device("cpu"), bench.timer(False))
    warm = result["warmup"]
    assert warm["variants"] >= 3 and warm["compiled"] == warm["predicted"] > warm["variants"]
    assert result["compiles_timed"] == 0
    assert [r["splits"] for r in result["decode"]] == [8, 4]  # buckets 1 and 2, 2 KV heads


def test_sweep_prints_and_writes_the_best_settings(tk, tmp_path, capsys) -> None:
    from pagedserve.bench import kernels as bench
    from pagedserve.kernels.triton.attention_tiles import _CHOSEN

    out = tmp_path / "sweep.json"
    assert bench.main(["--cpu-smoke", "--sweep", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    head = result["head_sizes"]["32"]
    for kind in ("decode", "prefill"):
        assert head[kind]["best"]["rel_diff"] <= 2e-2
        assert head[kind]["rows"][0]["rel_diff"] == 0.0  # the default runs first, the baseline
    assert set(head["best"]) == set(head["default"])
    assert "set_tile_settings(32, torch.float16, TileSettings(" in capsys.readouterr().out
    assert not _CHOSEN  # the sweep leaves the process on the default settings
