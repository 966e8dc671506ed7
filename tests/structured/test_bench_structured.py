"""`python -m pagedserve.bench.structured` runs end to end (tiny model, a few requests, one round)
and reports what docs/benchmarks.md quotes: the three runs, the shares, where a constrained step's
time goes, and compile times with nothing recompiled on repeat."""

from __future__ import annotations

import json

import pytest

from pagedserve.bench import structured
from tests.conftest import model_dir

pytestmark = pytest.mark.timeout(300)


def test_bench_reports_every_figure(tmp_path, capsys) -> None:
    out = tmp_path / "structured.json"
    argv = ["--model", str(model_dir("llama")), "--requests", "4", "--max-tokens", "8",
            "--rounds", "2", "--dtype", "float32", "--out", str(out)]
    assert structured.main(argv) == 0
    report = json.loads(out.read_text())
    assert "mixed: unconstrained half / alone" in capsys.readouterr().out  # the table
    median, best = report["median"], report["best_round"]
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
    # the best-round shares are ratios of each run's fastest round
    fastest = {run: min(r[run]["seconds"] for r in report["rounds"])
               for run in ("unconstrained", "constrained", "mixed")}
    assert best["mixed_unconstrained_share"] == pytest.approx(
        fastest["unconstrained"] / fastest["mixed"])
    assert best["constrained_share"] == pytest.approx(
        fastest["unconstrained"] / fastest["constrained"])
