"""bench.bf16_gemm runs, prints its table and writes one row per shape and row count, each
GFLOP/s figure consistent with its speedup."""

from __future__ import annotations

import json

import pytest

from pagedserve.bench import bf16_gemm
from pagedserve.kernels.cpu import panel_gemm512


def test_writes_a_row_per_shape_and_row_count(tmp_path, monkeypatch, capsys) -> None:
    if not panel_gemm512.available():
        pytest.skip("panel_gemm512 needs AVX-512")
    monkeypatch.setattr(bf16_gemm, "SHAPES", (("tiny", 70, 64),))
    monkeypatch.setattr(bf16_gemm, "_seconds", lambda fn, budget=0.2: (fn(), 1e-3)[1])
    out = tmp_path / "r.json"
    bf16_gemm.main(["--rows", "1,13", "--rounds", "1", "--out", str(out)])
    table = json.loads(out.read_text())["table"]
    assert [(r["shape"], r["rows"]) for r in table] == [("tiny", 1), ("tiny", 13)]
    for r in table:
        assert r["speedup"] == pytest.approx(r["pairs_gflops"] / r["onednn_gflops"])
    assert "oneDNN GFLOP/s" in capsys.readouterr().out
