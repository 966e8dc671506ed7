"""`pagedserve serve --pipeline-parallel-size 2` (executor/pipeline_parallel.py), alone and with
--tensor-parallel-size 2: the same greedy completions as one rank in-process, and a rank of the
last stage killed with SIGKILL mid-generation ends its executor, which the supervisor restarts;
the scheduler resends what was running and every request completes."""

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from pagedserve import LLM, SamplingParams
from tests.e2e.conftest import children_of, running_serve

pytestmark = pytest.mark.timeout(300)

PROMPTS = ["def hello(x):", "import os\nimport sys\n", "class Foo:\n    def __init__(self"]
MAX_TOKENS = 24


def _ranks(serve_pid: int) -> list[int]:
    """The executor's other ranks (its children), by pid, in rank order."""
    executor = [pid for pid, cmd in children_of(serve_pid).items() if "cli executor" in cmd]
    ranks = {pid: cmd for e in executor for pid, cmd in children_of(e).items()
             if "executor.tensor_parallel" in cmd}
    return sorted(ranks, key=lambda pid: int(ranks[pid].split("--rank ")[1].split()[0]))


@pytest.mark.parametrize(("tp", "killed"), [(1, 1), (2, 3)], ids=["pp2", "tp2-pp2"])
def test_serve_pipeline_parallel_matches_one_rank_and_survives_a_killed_rank(
        llama_dir: Path, tmp_path: Path, tp: int, killed: int) -> None:
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    with LLM(str(llama_dir), dtype="float32", num_kv_blocks=64) as llm:
        want = [o.outputs[0].text for o in llm.generate(PROMPTS, params)]
    args = [str(llama_dir), "--grpc-port", "-1", "--num-kv-blocks", "64", "--dtype", "float32",
            "--drain-timeout", "5", "--pipeline-parallel-size", "2",
            "--tensor-parallel-size", str(tp)]
    with running_serve(args, tmp_path / "serve.log", llama_dir) as server:
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0,
                               timeout=120)

        def complete(prompt: str) -> str:
            return client.completions.create(
                model="", prompt=prompt, temperature=0, max_tokens=MAX_TOKENS,
                extra_body={"ignore_eos": True}).choices[0].text

        assert [complete(p) for p in PROMPTS] == want
        ranks = _ranks(server.proc.pid)
        assert len(ranks) == 2 * tp - 1
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            pending = [pool.submit(complete, p) for p in PROMPTS * 2]
            # killed once a streamed request has its first token: mid-generation, however fast
            chunks = iter(client.completions.create(
                model="", prompt=PROMPTS[0], temperature=0, max_tokens=MAX_TOKENS, stream=True,
                extra_body={"ignore_eos": True}))
            streamed = next(chunks).choices[0].text
            os.kill(ranks[killed - 1], signal.SIGKILL)
            streamed += "".join(c.choices[0].text for c in chunks)
            got = [f.result() for f in pending]
        assert got == want * 2, server.log()
        assert streamed == want[0]
        log = server.log_path.read_text(errors="replace")
        assert f"rank {killed} died" in log, log[-20000:]
        restarted = _ranks(server.proc.pid)
        assert len(restarted) == 2 * tp - 1 and ranks[killed - 1] not in restarted
