"""A scheduler killed mid-stream loses nothing (router/resume.py): the router resubmits each open
request to the restarted scheduler as a continuation, and every stream, greedy or seeded, goes on
to exactly the text of the same request run undisturbed through the same services (itself
checked against the in-process reference tokens). In bf16 that takes --batch-invariant: the
restarted scheduler has the executor recompute each request's prompt and outputs in one prompt
pass, which without it rounds differently from the decode steps that first computed them."""

from __future__ import annotations

import threading
from pathlib import Path

import openai
import pytest

from pagedserve.router.server import RouterThread
from pagedserve.router.tokenizer import Tokenizer
from tests.services.conftest import (
    EXECUTOR_SERVICE,
    MAX_TOKENS,
    SCHEDULER_SERVICE,
    Service,
    executor_argv,
    prompts,
    scheduler_argv,
)

pytestmark = pytest.mark.timeout(240)
SEEDED = {"temperature": 1.0, "seed": 3}


def _stream(client: openai.OpenAI, prompt: list[int], sampling: dict, first: threading.Event,
            out: dict, key: str) -> None:
    try:
        text = []
        for chunk in client.completions.create(model="", prompt=prompt, max_tokens=MAX_TOKENS,
                                               stream=True, extra_body={"ignore_eos": True},
                                               **sampling):
            if chunk.choices and chunk.choices[0].text:
                text.append(chunk.choices[0].text)
                first.set()
        out[key] = "".join(text)
    except Exception as e:  # the assertion below names it
        out[key] = e
        first.set()


@pytest.mark.parametrize("options", [(), ("--dtype", "bfloat16", "--batch-invariant")],
                         ids=["float32", "bf16-batch-invariant"])
def test_a_killed_scheduler_loses_no_request_and_no_token(
        llama_dir: Path, sock_dir: Path, reference_tokens: dict[str, list[int]],
        options: tuple[str, ...]) -> None:
    executor_address = f"unix://{sock_dir}/executor.sock"
    address = f"unix://{sock_dir}/scheduler.sock"
    services = [Service("executor", executor_argv(llama_dir, executor_address, *options),
                        sock_dir)]
    try:
        services[0].wait_serving(executor_address, EXECUTOR_SERVICE)
        services.append(Service("scheduler", scheduler_argv(executor_address, address), sock_dir))
        services[1].wait_serving(address, SCHEDULER_SERVICE)
        with RouterThread(llama_dir, address,
                          core_options={"scheduler_resume_timeout_s": 60}) as router:
            client = openai.OpenAI(base_url=router.base_url + "/v1", api_key="x", timeout=120,
                                   max_retries=0)
            jobs = [("seeded", prompts()["req-1"], SEEDED)] + [
                (rid, p, {"temperature": 0}) for rid, p in prompts().items()]
            undisturbed = {key: client.completions.create(
                model="", prompt=p, max_tokens=MAX_TOKENS, extra_body={"ignore_eos": True},
                logprobs=0, **s).choices[0] for key, p, s in jobs}
            out: dict = {}
            first = threading.Event()
            threads = [threading.Thread(target=_stream, args=(client, p, s, first, out, k))
                       for k, p, s in jobs]
            for t in threads:
                t.start()
            assert first.wait(60)
            services[1].kill()  # mid-stream: outputs so far are the router's only copy
            services.append(Service("scheduler", scheduler_argv(executor_address, address),
                                    sock_dir))
            services[2].wait_serving(address, SCHEDULER_SERVICE)
            for t in threads:
                t.join(120)
    finally:
        for service in services:
            service.kill()
    tokenizer = Tokenizer.from_dir(llama_dir)
    for rid, tokens in reference_tokens.items() if not options else ():  # float32's reference
        assert undisturbed[rid].logprobs.tokens == [tokenizer.token_text(t) for t in tokens], rid
    for key, _, _ in jobs:
        assert out[key] == undisturbed[key].text, key
