"""Time per output token and inter-token latency: one TPOT per finished sequence of two or more
tokens, one ITL observation per token after each sequence's first."""

from __future__ import annotations

import httpx

from tests.router.conftest import SERVED


def counts(router) -> dict[str, float]:
    text = httpx.get(router.base_url + "/metrics", timeout=10).text
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
            if line.startswith(("pagedserve_time_per_output_token_seconds_count",
                                "pagedserve_inter_token_latency_seconds_count"))}


def test_each_sequence_adds_one_tpot_and_its_later_tokens_to_itl(router, client, fake) -> None:
    fake.tokens_per_message = 2  # gaps carry two tokens: ITL counts both
    before = counts(router)
    client.completions.create(model=SERVED, prompt="Hello", max_tokens=7, n=2, temperature=0,
                              extra_body={"ignore_eos": True})
    after = counts(router)
    tpot, itl = (after[k] - before[k] for k in (
        "pagedserve_time_per_output_token_seconds_count",
        "pagedserve_inter_token_latency_seconds_count"))
    assert tpot == 2  # two sequences
    assert itl == 2 * (7 - 2)  # each: messages of 2, 2, 2, 1 tokens; the first has no gap before it
