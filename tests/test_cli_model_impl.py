"""`--model-impl` and `--trust-remote-code` on the executor and serve commands; a model the
fallback cannot run ends the executor with one line naming the architecture and why."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pagedserve.cli import build_parser
from pagedserve.serve import build_specs

ROOT = Path(__file__).resolve().parent.parent


def test_executor_takes_model_impl() -> None:
    args = build_parser().parse_args(["executor", "m"])
    assert (args.model_impl, args.trust_remote_code) == ("auto", False)
    args = build_parser().parse_args(["executor", "m", "--model-impl", "transformers",
                                      "--trust-remote-code"])
    assert (args.model_impl, args.trust_remote_code) == ("transformers", True)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["executor", "m", "--model-impl", "vllm"])


def test_serve_hands_model_impl_to_its_executor(tmp_path: Path) -> None:
    args = build_parser().parse_args(["serve", "m", "--model-impl", "native",
                                      "--trust-remote-code"])
    executor = next(s for s in build_specs(args, "m", str(tmp_path)) if s.name == "executor")
    assert "--model-impl native" in " ".join(executor.argv)
    assert "--trust-remote-code" in executor.argv
    plain = build_parser().parse_args(["serve", "m"])
    executor = next(s for s in build_specs(plain, "m", str(tmp_path)) if s.name == "executor")
    assert "--model-impl" not in executor.argv and "--trust-remote-code" not in executor.argv


def test_executor_refuses_a_state_space_model_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(
        {"architectures": ["MambaForCausalLM"], "model_type": "mamba"}))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "pagedserve.cli", "executor", str(tmp_path),
                           "--listen", f"unix://{tmp_path}/x.sock"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert lines == [f"pagedserve executor: error: {tmp_path / 'config.json'}: MambaForCausalLM: "
                     "model type 'mamba' has state-space or recurrent layers, whose state is not "
                     "a paged K/V cache"]
