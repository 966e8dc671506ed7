"""`pagedserve serve --tensor-parallel-size 2` (executor/tensor_parallel.py): the same greedy
completions as one rank in-process, and a rank killed with SIGKILL ends its executor, which the
supervisor restarts; the scheduler resends what was running and every request completes
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


def test_serve_tensor_parallel_matches_one_rank_and_survives_a_killed_rank(
        llama_dir: Path, tmp_path: Path) -> None:
    want = one_rank_texts(llama_dir)
    with ranked_serve(llama_dir, tmp_path / "serve.log",
                      "--tensor-parallel-size", "2") as (server, client, complete):
        assert [complete(p) for p in PROMPTS] == want
        (rank,) = rank_pids(server.proc.pid)
        log = kill_mid_stream(server, client, complete, rank, want)
        assert "tensor-parallel rank 1 died" in log, log[-20000:]
        assert rank_pids(server.proc.pid) not in ([], [rank])  # the restarted executor's own rank
