"""`pagedserve serve` with no model argument (what `make serve` runs) serves SmolLM2-135M-Instruct,
and the official openai client gets a sentence naming Paris for the capital of France, whole and
streamed. Default dtype, as a newcomer would run it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.e2e.conftest import Serve, running_serve

pytestmark = [pytest.mark.real_model, pytest.mark.timeout(300)]

STARTUP_TIMEOUT_S = 240.0  # executor: read, dequantize and pack 135M parameters on a busy CPU
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    args = ["--grpc-port", "-1", "--max-model-len", "1024", "--num-kv-blocks", "128",
            "--drain-timeout", "5"]  # no model: the default one
    env = {"PAGEDSERVE_CACHE": str(smollm2.parent.parent)}  # where the fixture found the file
    with running_serve(args, tmp_path_factory.mktemp("serve") / "serve.log", smollm2, env=env,
                       startup_timeout_s=STARTUP_TIMEOUT_S) as serve:
        yield serve


def test_serves_the_real_model_by_default(server: Serve, smollm2: Path) -> None:
    assert f"pagedserve is ready: model {smollm2}" in server.log()


def test_openai_client_gets_paris(server: Serve) -> None:
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0,
                           timeout=60)
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(model=model, messages=QUESTION, temperature=0,
                                           max_tokens=32)
    text = reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop"
    assert "Paris" in text and text.rstrip().endswith("."), text
    stream = client.chat.completions.create(model=model, messages=QUESTION, temperature=0,
                                            max_tokens=32, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == text
    print(f"\nQ: {QUESTION[0]['content']}\nA: {text}")
