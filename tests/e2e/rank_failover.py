"""The served-rank scenario that tensor parallelism, pipeline parallelism and the Ray backend share:
`pagedserve serve` over several executor ranks answers as one rank in-process does, and a rank
SIGKILLed while a request streams ends its executor, which the supervisor restarts; the scheduler
resends what was running and every request completes with the same text."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import openai

from pagedserve import LLM, SamplingParams
from tests.e2e.conftest import children_of, running_serve

PROMPTS = ["def hello(x):", "import os\nimport sys\n", "class Foo:\n    def __init__(self"]
MAX_TOKENS = 24


def rank_pids(serve_pid: int) -> list[int]:
    """The executor's other ranks (its children, started by the mp launcher), in rank order."""
    executor = [pid for pid, cmd in children_of(serve_pid).items() if "cli executor" in cmd]
    ranks = {pid: cmd for e in executor for pid, cmd in children_of(e).items()
             if "executor.tensor_parallel" in cmd}
    return sorted(ranks, key=lambda pid: int(ranks[pid].split("--rank ")[1].split()[0]))


@contextmanager
def ranked_serve(llama_dir: Path, log: Path, *parallel_args: str) -> Iterator[tuple]:
    """(server, client, complete) for `serve` with parallel_args, float32 and 64 KV blocks as the
    one-rank reference; complete(prompt) is a greedy completion of MAX_TOKENS."""
    args = [str(llama_dir), "--grpc-port", "-1", "--num-kv-blocks", "64", "--dtype", "float32",
            "--drain-timeout", "5", *parallel_args]
    with running_serve(args, log, llama_dir) as server:
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0,
                               timeout=120)

        def complete(prompt: str) -> str:
            return client.completions.create(
                model="", prompt=prompt, temperature=0, max_tokens=MAX_TOKENS,
                extra_body={"ignore_eos": True}).choices[0].text

        yield server, client, complete


def one_rank_texts(llama_dir: Path) -> list[str]:
    """PROMPTS' greedy completions from one rank in-process: what every layout must give."""
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    with LLM(str(llama_dir), dtype="float32", num_kv_blocks=64) as llm:
        return [o.outputs[0].text for o in llm.generate(PROMPTS, params)]


def kill_mid_stream(server, client: openai.OpenAI, complete: Callable[[str], str], pid: int,
                    want: list[str]) -> str:
    """SIGKILLs pid once a streamed request has its first token (mid-generation, however fast
    steps are) while PROMPTS run twice over; asserts every completion, the stream included, is the
    undisturbed text. Returns the serve log."""
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        pending = [pool.submit(complete, p) for p in PROMPTS * 2]
        chunks = iter(client.completions.create(
            model="", prompt=PROMPTS[0], temperature=0, max_tokens=MAX_TOKENS, stream=True,
            extra_body={"ignore_eos": True}))
        streamed = next(chunks).choices[0].text
        os.kill(pid, signal.SIGKILL)
        streamed += "".join(c.choices[0].text for c in chunks)
        got = [f.result() for f in pending]
    assert got == want * 2, server.log()
    assert streamed == want[0]
    return server.log_path.read_text(errors="replace")
