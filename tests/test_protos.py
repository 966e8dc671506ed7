"""The checked-in stubs are exactly what protoc generates from protos/*.proto."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_regenerating_stubs_changes_nothing(tmp_path: Path) -> None:
    env = dict(os.environ, OUT_DIR=str(tmp_path), PYTHON=sys.executable)
    subprocess.run(["bash", "scripts/gen_protos.sh"], cwd=ROOT, env=env, check=True)
    generated = sorted(p.name for p in (tmp_path / "protos").iterdir())
    checked_in = sorted(p.name for p in (ROOT / "protos").glob("*_pb2*"))
    assert generated == checked_in
    for name in generated:
        fresh = (tmp_path / "protos" / name).read_text()
        assert fresh == (ROOT / "protos" / name).read_text(), f"protos/{name} is stale: run make protos"


def test_step_plan_round_trips() -> None:
    from pagedserve.protos import executor_pb2

    plan = executor_pb2.StepPlan(step_id=7)
    new = plan.new_requests.add(request_id="a", prompt_token_ids=[1, 2, 3], block_ids=[4])
    new.sampling.temperature = 0.5
    new.sampling.seed = 11
    plan.continuing_requests.add(request_id="b", new_block_ids=[9], num_scheduled_tokens=1)
    back = executor_pb2.StepPlan.FromString(plan.SerializeToString())
    assert back == plan
    assert back.new_requests[0].sampling.HasField("seed")
    assert not back.new_requests[0].sampling.HasField("logprobs")
