"""Prompt lookup on the real model: on requests that quote their input, drafts are proposed and
mostly accepted, and the greedy output is the one without speculation, offline and through
`serve --speculative-config` with the official openai client (float32: bf16 near-ties may flip
between the verification pass and one-token decode, as batching can flip them)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from pagedserve import LLM, SamplingParams
from pagedserve.router.metrics import PREFIX
from tests.conftest import ROOT
from tests.e2e.conftest import Serve, _stop, free_port

pytestmark = [pytest.mark.real_model, pytest.mark.timeout(600)]

SPEC = '{"method": "ngram", "num_speculative_tokens": 4}'
CODE = ("def area(width, height):\n    \"\"\"The area of a rectangle.\"\"\"\n"
        "    return width * height\n")
CHATS = [
    [{"role": "user", "content": f"Repeat this code exactly:\n\n{CODE}"}],
    [{"role": "user", "content": "Rewrite this function, renaming `area` to `rect_area` and "
                                 f"changing nothing else:\n\n{CODE}"}],
]
GREEDY = SamplingParams(temperature=0, max_tokens=64)


@pytest.fixture(scope="module")
def plain_outputs(smollm2: Path) -> list[list[int]]:
    llm = LLM(smollm2, dtype="float32", max_model_len=1024)
    return [o.outputs[0].token_ids for o in llm.chat(CHATS, GREEDY)]


def test_offline_prompt_lookup_is_exact_and_accepted(smollm2: Path,
                                                      plain_outputs: list[list[int]]) -> None:
    llm = LLM(smollm2, dtype="float32", max_model_len=1024, speculative_config=SPEC)
    outputs = [llm.chat(chat, GREEDY)[0].outputs[0].token_ids for chat in CHATS]  # batch 1
    assert outputs == plain_outputs
    stats = llm.scheduler.stats()
    assert stats.spec_verifications > 0
    assert stats.spec_accepted_tokens > 0.3 * stats.spec_draft_tokens, stats


@pytest.fixture(scope="module")
def server(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    argv = [sys.executable, "-m", "pagedserve.cli", "serve", str(smollm2), "--port", str(port),
            "--grpc-port", "-1", "--max-model-len", "1024", "--num-kv-blocks", "128",
            "--dtype", "float32", "--drain-timeout", "5", "--speculative-config", SPEC]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    serve = Serve(proc, log_path, smollm2, port, -1)
    try:
        deadline = time.monotonic() + 240
        while "pagedserve is ready" not in log_path.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"serve exited with {proc.poll()} or was not ready:\n{serve.log()}")
            time.sleep(0.2)
        yield serve
    finally:
        rc = _stop(serve)
    assert rc == 0, serve.log()


def test_served_prompt_lookup_is_exact_and_counted(server: Serve, smollm2: Path,
                                                   plain_outputs: list[list[int]]) -> None:
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0,
                           timeout=120)
    texts = []
    for chat in CHATS:
        reply = client.chat.completions.create(model="", messages=chat, temperature=0,
                                               max_tokens=64)
        texts.append(reply.choices[0].message.content)
    metrics = urllib.request.urlopen(f"{server.base_url}/metrics", timeout=30).read().decode()
    accepted = re.search(rf"^{PREFIX}_spec_decode_num_accepted_tokens_total (\S+)$", metrics,
                         re.M)
    assert accepted is not None and float(accepted.group(1)) > 0, metrics
    assert texts == [_decode(smollm2, ids) for ids in plain_outputs]


def _decode(model: Path, ids: list[int]) -> str:
    from pagedserve.llm import load_tokenizer

    return load_tokenizer(str(model)).decode(ids, skip_special_tokens=True)
