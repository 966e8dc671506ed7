"""Forced runs (executor/structured.py): where the grammar forces tokens, the executor writes
each mask as the one forced token and consumes a run's tokens together. Checked against
llguidance's own mask, from a second matcher that consumes every token as it comes, along random
walks through the schema suite, on the test vocabulary and on SmolLM2's."""

from __future__ import annotations

import random

import numpy as np
import torch

from pagedserve.bench.structured_schemas import schemas
from pagedserve.executor.structured import StructuredOutputs
from pagedserve.protos import executor_pb2
from pagedserve.router.structured_outputs import json_schema
from tests.conftest import model_dir

EOS = [1, 3]


def _allowed_bits(words: np.ndarray, vocab: int) -> np.ndarray:
    return np.unpackbits(words.view(np.uint8), bitorder="little")[:vocab].astype(bool)


def _walk(outputs: StructuredOutputs, grammars: list[str], steps: int, seed: int) -> dict:
    """Every grammar as one request of one batch; each step, every row's mask against its
    reference matcher's, then a random allowed token. Returns counts of forced and free rows."""
    rng = random.Random(seed)
    ids = [f"r{i}" for i in range(len(grammars))]
    refs = []
    for rid, grammar in zip(ids, grammars):
        sampling = executor_pb2.SamplingParams(temperature=1.0)
        sampling.structured.grammar = grammar
        outputs.add(rid, sampling, [])
        refs.append(outputs.cache.matcher(grammar))
    seen = {"forced": 0, "free": 0}
    live = list(range(len(ids)))
    for _ in range(steps):
        bitmask = outputs.start([ids[i] for i in live]).future.result()
        for row, i in enumerate(live):
            ours = _allowed_bits(bitmask[row], outputs.vocab_size)
            theirs = _allowed_bits(np.frombuffer(refs[i].compute_bitmask(), dtype=np.int32),
                                   outputs.vocab_size)
            assert np.array_equal(ours, theirs), f"{ids[i]}: masks differ"
            seen["forced" if ours.sum() == 1 else "free"] += 1
        still = []
        for row, i in enumerate(live):
            token = rng.choice(np.flatnonzero(_allowed_bits(bitmask[row], outputs.vocab_size)))
            if int(token) in EOS:
                outputs.forget(ids[i])
                continue
            outputs.advance(ids[i], int(token))
            assert refs[i].consume_token(int(token))
            still.append(i)
        live = still
    return seen


def test_forced_runs_equal_llguidance_masks_on_the_test_vocabulary() -> None:
    outputs = StructuredOutputs(model_dir("llama"), 2048, EOS, torch.device("cpu"))
    grammars = [json_schema(s, "x").grammar for s in schemas()[:40]]
    seen = _walk(outputs, grammars, steps=40, seed=0)
    assert seen["forced"] > 100 and seen["free"] > 100  # both kinds of rows were checked


def test_forced_runs_equal_llguidance_masks_on_smollm2(smollm2) -> None:
    outputs = StructuredOutputs(smollm2, 49152, [2], torch.device("cpu"))
    grammars = [json_schema(s, "x").grammar for s in schemas()[40:64]]
    seen = _walk(outputs, grammars, steps=30, seed=1)
    assert seen["forced"] > 50 and seen["free"] > 50


def test_leaving_a_forced_run_catches_the_matcher_up() -> None:
    """A token off the forced run (never sampled under its mask, but a matcher must not lose
    the run's tokens): the run's tokens and that one reach the matcher, in order."""
    outputs = StructuredOutputs(model_dir("llama"), 2048, EOS, torch.device("cpu"))
    grammar = json_schema({"type": "object", "properties": {"alpha_beta_gamma": {"type": "integer"}},
                           "required": ["alpha_beta_gamma"]}, "x").grammar
    sampling = executor_pb2.SamplingParams(temperature=1.0)
    sampling.structured.grammar = grammar
    outputs.add("r", sampling, [])
    ref = outputs.cache.matcher(grammar)
    walked = []
    for _ in range(3):  # into the forced key
        words = outputs.start(["r"]).future.result()[0]
        (token,) = np.flatnonzero(_allowed_bits(words, 2048))
        outputs.advance("r", int(token))
        walked.append(int(token))
    assert outputs._requests["r"].behind  # consumed together later
    outputs.advance("r", 2000)  # off the run
    assert not ref.consume_tokens([*walked, 2000]) and ref.is_error()
    assert outputs._requests["r"].matcher.is_error()  # caught up: the same state as ref
    words = outputs.start(["r"]).future.result()[0]
    assert set(np.flatnonzero(_allowed_bits(words, 2048))) == set(EOS)  # ends with EOS


def test_a_replayed_request_starts_without_a_run() -> None:
    outputs = StructuredOutputs(model_dir("llama"), 2048, EOS, torch.device("cpu"))
    grammar = json_schema({"type": "object", "properties": {"longer_key_name": {"enum": [1, 2]}},
                           "required": ["longer_key_name"]}, "x").grammar
    sampling = executor_pb2.SamplingParams(temperature=1.0)
    sampling.structured.grammar = grammar
    outputs.add("r", sampling, [])
    first = outputs.start(["r"]).future.result()[0]
    (token,) = np.flatnonzero(_allowed_bits(first, 2048))
    outputs.advance("r", int(token))
    outputs.add("r", sampling, [int(token)])  # resent after preemption: state rebuilt
    ref = outputs.cache.matcher(grammar)
    ref.consume_token(int(token))
    words = outputs.start(["r"]).future.result()[0]
    theirs = np.frombuffer(ref.compute_bitmask(), dtype=np.int32)
    assert np.array_equal(_allowed_bits(words, 2048), _allowed_bits(theirs, 2048))
