"""bench.cpu_decode_attention runs at a tiny size and reports what it timed."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT


def test_it_prints_and_writes_a_row_per_shape(tmp_path) -> None:
    out = tmp_path / "attn.json"
    printed = subprocess.run(
        [sys.executable, "-m", "pagedserve.cli", "bench", "cpu-decode-attention", "--layers", "2",
         "--shapes", "2x40,1x17", "--rounds", "1", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, check=True, timeout=300).stdout
    rows = json.loads(out.read_text())["rows"]
    assert [(r["batch"], r["context"]) for r in rows] == [(2, 40), (1, 17)]
    assert all(r["ms_per_step"] > 0 and r["kv_gb_per_s"] > 0 for r in rows)
    assert "K/V GB/s" in printed and "torch copy" in printed
