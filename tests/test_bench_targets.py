"""bench.targets' verdicts on hand-written benchmark results, at issue 7's bounds.

Issue 7 states the targets in words: offline output tok/s "at least 4x transformers' best static
batching" and "at least 50% of the measured ceiling"; served "at least 85% of the offline
figure"; scheduler plus RPC "at most 10% of the step". Each figure is written just at its bound
and one float step past it on the failing side, the other three comfortably met: a bound moved
by any amount, or a >= turned into >, flips one of these verdicts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pagedserve.bench import targets

MET = {"ratio": 6.0, "ceiling_share": 0.7, "served_share": 0.95, "overhead_share": 0.03}
ISSUE_BOUNDS = [("ratio", 4.0, -math.inf), ("ceiling_share", 0.5, -math.inf),
                ("served_share", 0.85, -math.inf), ("overhead_share", 0.10, math.inf)]


def _write(out: Path, ratio: float, ceiling_share: float, served_share: float,
           overhead_share: float) -> None:
    """The fields bench.throughput, bench.serve and bench.step_overhead write (a ceiling of 1
    token/s, so the computed rate is the share itself, unrounded)."""
    (out / "throughput.json").write_text(json.dumps({
        "ratio": ratio, "pagedserve": {"computed_tokens_per_s": ceiling_share},
        "roofline": {"ceiling_tokens_per_s": 1.0}}))
    (out / "serve.json").write_text(json.dumps(
        {"comparison": {"serve_share_of_offline": served_share}}))
    (out / "step_overhead.json").write_text(json.dumps({"per_step": {"overhead_share":
                                                                     overhead_share}}))


def _verdicts(out: Path, figures: dict[str, float]) -> list[bool]:
    _write(out, **figures)
    rows = targets.targets(out)
    assert [t.measured for t in rows] == list(figures.values())  # read back unchanged
    return [t.met for t in rows]


@pytest.mark.parametrize("index", range(4), ids=[b[0] for b in ISSUE_BOUNDS])
def test_each_verdict_flips_at_the_issues_bound(tmp_path: Path, index: int) -> None:
    figure, bound, failing_side = ISSUE_BOUNDS[index]
    assert _verdicts(tmp_path, {**MET, figure: bound}) == [True] * 4  # the bound itself is met
    past = math.nextafter(bound, failing_side)
    assert _verdicts(tmp_path, {**MET, figure: past}) == [i != index for i in range(4)]


def test_the_table_says_which_target_is_not_met(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    _write(tmp_path, **{**MET, "served_share": 0.5})
    targets.print_table(targets.targets(tmp_path))
    lines = capsys.readouterr().out.splitlines()
    assert [line.endswith("NOT MET") for line in lines[2:]] == [False, False, True, False]
    assert "50.0%" in lines[4] and ">= 85.0%" in lines[4]


@pytest.mark.parametrize("index, bound", [(1, 0.60), (2, 0.90)], ids=["ceiling", "served"])
def test_an_avx512_bf16_cpu_is_held_to_issue_18s_bounds(tmp_path: Path, index: int,
                                                         bound: float) -> None:
    """Issue 18 raises two bounds on CPUs with AVX-512 bf16: the verdict flips at the new bound,
    and a figure that meets issue 7's bound there does not meet issue 18's."""
    assert targets.bounds_for(["avx2", "avx512f", "avx512_bf16"]) is targets.ISSUE_18
    assert targets.bounds_for(["avx2", "avx512f"]) is targets.ISSUE_7
    figure = ISSUE_BOUNDS[index][0]
    _write(tmp_path, **{**MET, figure: bound})
    assert [t.met for t in targets.targets(tmp_path, targets.ISSUE_18)] == [True] * 4
    _write(tmp_path, **{**MET, figure: math.nextafter(bound, -math.inf)})
    assert [t.met for t in targets.targets(tmp_path, targets.ISSUE_18)] == \
        [i != index for i in range(4)]
    assert all(t.met for t in targets.targets(tmp_path, targets.ISSUE_7))
