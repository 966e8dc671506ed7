"""`python -m pagedserve.bench.structured` runs end to end (tiny model, a few requests, one round)
and reports what docs/benchmarks.md quotes: the three runs, the shares, where a constrained step's
time goes, and compile times with nothing recompiled on repeat."""

from __future__ import annotations

import json
import sys

import pytest

from pagedserve.bench import structured
from tests.conftest import model_dir

pytestmark = pytest.mark.timeout(300)


def test_bench_reports_every_figure(monkeypatch, capsys) -> None:
    argv = ["structured", "--model", str(model_dir("llama")), "--requests", "4",
            "--max-tokens", "8", "--rounds", "1", "--dtype", "float32"]
    monkeypatch.setattr(sys, "argv", argv)
    structured.main()
    out = "\n" + capsys.readouterr().out
    report = json.loads(out[out.index("\n{") + 1:])  # after any log lines
    median = report["median"]
    for run in ("unconstrained", "constrained", "mixed"):
        assert median[run]["tokens_per_s"] > 0
    assert median["constrained_share"] > 0 and median["mixed_unconstrained_share"] > 0
    assert median["constrained"]["fill_ms_per_step"] > 0
    # a JSON schema forces some tokens (quotes, keys) and leaves others free
    assert 0 < median["constrained"]["forced_mask_share"] < 1
    assert "forced_mask_share" not in median["unconstrained"]
    assert report["mask_work_alone"]["fill_cpu_ms_per_step"] > 0
    assert report["compile"]["schemas"] >= 100
    assert report["compile"]["recompiles_on_repeat"] == 0
