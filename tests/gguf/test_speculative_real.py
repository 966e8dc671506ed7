"""Prompt lookup on the real model: on requests that quote their input, drafts are proposed and
mostly accepted, and the greedy output is the one without speculation, offline and through
`serve --speculative-config` with the official openai client (float32: bf16 near-ties may flip
between the verification pass and one-token decode, as batching can flip them)."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from pagedserve import LLM, SamplingParams
from pagedserve.router.metrics import PREFIX
from tests.e2e.conftest import Serve, running_serve

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
    args = [str(smollm2), "--grpc-port", "-1", "--max-model-len", "1024", "--num-kv-blocks",
            "128", "--dtype", "float32", "--drain-timeout", "5", "--speculative-config", SPEC]
    with running_serve(args, tmp_path_factory.mktemp("serve") / "serve.log", smollm2,
                       startup_timeout_s=240) as serve:
        yield serve


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


def test_offline_draft_model_is_exact_and_accepted(smollm2: Path,
                                                   plain_outputs: list[list[int]]) -> None:
    """The model as its own draft (a GGUF draft, the vocabularies compared from its metadata):
    every proposal is accepted, and the outputs are those without speculation."""
    spec = {"method": "draft_model", "model": str(smollm2), "num_speculative_tokens": 4}
    llm = LLM(smollm2, dtype="float32", max_model_len=1024, speculative_config=spec)
    outputs = [llm.chat(chat, GREEDY)[0].outputs[0].token_ids for chat in CHATS]
    assert outputs == plain_outputs
    stats = llm.scheduler.stats()
    assert 0 < stats.spec_accepted_tokens == stats.spec_draft_tokens, stats
