"""Constraints on a GGUF model (SmolLM2-135M-Instruct, the default): the executor's llguidance
tokenizer, built from the file's vocabulary, sees every token as the router's does (whose
tokenizer tests/gguf holds to transformers'); JSON-schema outputs of the real model, offline,
validate with the jsonschema package; the router checks constraints for a GGUF model too."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import jsonschema
import llguidance
import pytest

from pagedserve.executor.structured import gguf_tokenizer
from pagedserve.router.gguf_tokenizer import load_gguf_tokenizer
from pagedserve.router.server import RouterThread
from tests.router.fake_scheduler import FakeSchedulerThread

pytestmark = [pytest.mark.real_model, pytest.mark.timeout(600)]
VOCAB, EOS = 49152, [2]  # SmolLM2's vocabulary and <|im_end|>
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "city"],
          "properties": {"name": {"type": "string", "maxLength": 20},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "city": {"enum": ["Paris", "London", "Rome"]}}}
ASK = [{"role": "user", "content": "Describe a person as JSON with name, age and city."}]


def test_the_vocabulary_is_the_routers(smollm2: Path) -> None:
    """Every token's bytes and specialness, against llguidance reading the tokenizer.json of the
    router's GGUF tokenizer."""
    ours = gguf_tokenizer(smollm2, VOCAB, EOS)
    hf, _, _ = load_gguf_tokenizer(smollm2)
    reference = llguidance.LLTokenizer(hf.to_str(), n_vocab=VOCAB, eos_token=EOS)
    assert ours.vocab_size == reference.vocab_size == VOCAB
    differ = [i for i in range(VOCAB) if ours.decode_bytes([i]) != reference.decode_bytes([i])
              or ours.is_special_token(i) != reference.is_special_token(i)]
    assert not differ, differ[:10]
    assert ours.is_special_token(EOS[0]) and ours.decode_bytes([EOS[0]]) == b"<|im_end|>"
    assert ours.tokenize_str('{"name":"') == reference.tokenize_str('{"name":"')


def test_json_schema_offline(smollm2: Path) -> None:
    from pagedserve import LLM, SamplingParams
    from pagedserve.sampling_params import StructuredOutputsParams

    llm = LLM(smollm2, max_model_len=512, num_kv_blocks=256, max_num_seqs=16)
    so = StructuredOutputsParams(json=PERSON)
    params = [SamplingParams(temperature=t, seed=s, max_tokens=80, structured_outputs=so)
              for t, s in [(0.0, 0), *((1.0, s) for s in range(7))]]
    outputs = llm.chat([ASK] * len(params), params)
    stopped = 0
    for out in outputs:
        c = out.outputs[0]
        if c.finish_reason == "stop":
            jsonschema.validate(json.loads(c.text), PERSON)
            stopped += 1
        else:
            assert c.finish_reason == "length"
    assert stopped >= len(params) // 2, [o.outputs[0].text for o in outputs]


def test_the_router_checks_constraints_for_a_gguf_model(smollm2: Path, tmp_path) -> None:
    fake = FakeSchedulerThread(f"unix://{tmp_path}/s.sock", vocab_size=VOCAB).start()
    try:
        with RouterThread(smollm2, fake.address, "smollm2") as r:
            rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
            body = {"messages": ASK, "max_tokens": 2, "response_format": rf}
            ok = httpx.post(r.base_url + "/v1/chat/completions", json=body, timeout=60)
            assert ok.status_code == 200, ok.text
            assert fake.servicer.requests[-1].sampling.structured.grammar.startswith(
                "start: %json")
            bad = {**body, "response_format": {"type": "json_schema", "json_schema": {
                "name": "x", "schema": {"type": "integr"}}}}
            refused = httpx.post(r.base_url + "/v1/chat/completions", json=bad, timeout=60)
            assert refused.status_code == 400
            assert refused.json()["error"]["param"] == "response_format.json_schema.schema"
    finally:
        fake.stop()
