"""`pagedserve serve --pipeline-parallel-size 2` (executor/pipeline_parallel.py), alone and with
--tensor-parallel-size 2: the same greedy completions as one rank in-process, and a rank of the
last stage killed with SIGKILL mid-generation ends its executor, which the supervisor restarts;
the scheduler resends what was running and every request completes
(tests/e2e/rank_failover.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.rank_failover import (
    PROMPTS,
    kill_mid_stream,
    one_rank_texts,
    rank_pids,
    ranked_serve,
)

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize(("tp", "killed"), [(1, 1), (2, 3)], ids=["pp2", "tp2-pp2"])
def test_serve_pipeline_parallel_matches_one_rank_and_survives_a_killed_rank(
        llama_dir: Path, tmp_path: Path, tp: int, killed: int) -> None:
    want = one_rank_texts(llama_dir)
    with ranked_serve(llama_dir, tmp_path / "serve.log", "--pipeline-parallel-size", "2",
                      "--tensor-parallel-size", str(tp)) as (server, client, complete):
        assert [complete(p) for p in PROMPTS] == want
        ranks = rank_pids(server.proc.pid)
        assert len(ranks) == 2 * tp - 1
        log = kill_mid_stream(server, client, complete, ranks[killed - 1], want)
        assert f"rank {killed} died" in log, log[-20000:]
        restarted = rank_pids(server.proc.pid)
        assert len(restarted) == 2 * tp - 1 and ranks[killed - 1] not in restarted
