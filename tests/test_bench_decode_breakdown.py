"""bench.decode_breakdown runs and accounts for the step: its pieces are each under the whole."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from pagedserve.executor.models.layer_loop import ENV_DISABLE
from tests.conftest import ROOT, model_dir


def test_it_prints_each_piece_of_a_step() -> None:
    # a process of its own: the benchmark wraps classes' methods with timers for good. The
    # modules, not the C layer loop (which a dense model takes where its GEMM is in panels)
    env = {**os.environ, ENV_DISABLE: "1"}
    out = subprocess.run([sys.executable, "-m", "pagedserve.bench.decode_breakdown",
                          str(model_dir("llama"))], cwd=ROOT, capture_output=True, text=True,
                         check=True, timeout=300, env=env).stdout
    per_step = {m[0].strip(): float(m[1]) for m in re.findall(r"^  (.{42}) +([\d.]+) ms/step", out,
                                                              re.M)}
    whole = per_step["executor.execute (whole step)"]
    assert per_step["linear GEMMs (qkv, gate-up, o, down)"] > 0
    assert all(0 < v <= whole * 1.001 for v in per_step.values()), per_step
    assert "128 steps" in out
