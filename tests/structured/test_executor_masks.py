"""executor/structured.py on its own: masks, EOS exactly where the grammar accepts, replay after
preemption equal to step-by-step advance, the compile cache, rows without a constraint untouched."""

from __future__ import annotations

import llguidance
import pytest
import torch

from pagedserve.executor.structured import StructuredOutputs, check_structured
from pagedserve.protos import executor_pb2
from pagedserve.router.structured_outputs import choice, json_schema, regex
from tests.conftest import model_dir

EOS = [1, 3]
VOCAB = 2048


@pytest.fixture(scope="module")
def tok() -> llguidance.LLTokenizer:
    path = model_dir("llama") / "tokenizer.json"
    return llguidance.LLTokenizer(path.read_text(), n_vocab=VOCAB, eos_token=EOS)


@pytest.fixture
def outputs() -> StructuredOutputs:
    return StructuredOutputs(model_dir("llama"), VOCAB, EOS, torch.device("cpu"))


def _sampling(grammar: str) -> executor_pb2.SamplingParams:
    p = executor_pb2.SamplingParams(temperature=1.0)
    p.structured.grammar = grammar
    return p


def _allowed(outputs: StructuredOutputs, rids: list[str]) -> list[set[int]]:
    logits = torch.zeros(len(rids), VOCAB)
    outputs.apply(logits, outputs.start(rids))
    return [set(torch.nonzero(row > float("-inf")).flatten().tolist()) for row in logits]


def test_eos_allowed_exactly_where_the_grammar_accepts(outputs, tok) -> None:
    outputs.add("r", _sampling(regex("ab(cd)?", "x").grammar), [])
    (first,) = _allowed(outputs, ["r"])
    assert not first & set(EOS) and first
    for t in tok.tokenize_str("ab"):
        outputs.advance("r", t)
    (after_ab,) = _allowed(outputs, ["r"])
    assert set(EOS) <= after_ab and len(after_ab) > len(EOS)  # may end, or go on with "cd"
    for t in tok.tokenize_str("cd"):
        outputs.advance("r", t)
    assert _allowed(outputs, ["r"]) == [set(EOS)]  # complete: only EOS


def test_unconstrained_rows_untouched_and_replay_equals_advance(outputs, tok) -> None:
    grammar = json_schema({"type": "object", "properties": {"k": {"enum": ["x", "yy"]}},
                           "required": ["k"]}, "x").grammar
    prefix = tok.tokenize_str('{"k":"y')
    outputs.add("stepwise", _sampling(grammar), [])
    for t in prefix:
        outputs.advance("stepwise", t)
    outputs.add("replayed", _sampling(grammar), prefix)  # as after preemption or a restart
    outputs.add("free", executor_pb2.SamplingParams(), [])
    assert "free" not in outputs and len(outputs) == 2
    stepwise, free, replayed = _allowed(outputs, ["stepwise", "free", "replayed"])
    assert stepwise == replayed and not stepwise & set(EOS)
    assert free == set(range(VOCAB))
    assert outputs.cache.compiles == 1  # the repeated grammar compiled once
    outputs.forget("stepwise")
    assert "stepwise" not in outputs


def test_matcher_in_error_ends_the_request_with_eos(outputs, tok) -> None:
    outputs.add("r", _sampling(choice(["alpha"], "x").grammar), [])
    outputs.advance("r", tok.tokenize_str("zzz")[0])  # never sampled under the mask; forced
    assert _allowed(outputs, ["r"]) == [set(EOS)]


def test_structured_requests_refuse_min_tokens() -> None:
    p = _sampling("start: \"a\"")
    check_structured("r", p)
    p.min_tokens = 2
    with pytest.raises(ValueError, match="min_tokens"):
        check_structured("r", p)
    with pytest.raises(ValueError, match="empty"):
        check_structured("r", _sampling(""))
    check_structured("r", _sampling('start: "a"'), model_dir("llama"))


def test_a_model_without_tokenizer_json_refuses_constraints(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"tokenizer\.json"):
        check_structured("r", _sampling('start: "a"'), tmp_path)
    check_structured("r", executor_pb2.SamplingParams(), tmp_path)  # unconstrained: fine


def test_the_scheduler_refuses_what_would_forbid_eos() -> None:
    from pagedserve.scheduler.config import SchedulerConfig
    from pagedserve.scheduler.request_spec import RequestSpec

    config = SchedulerConfig(max_model_len=64, num_kv_blocks=16, block_size=16,
                             eos_token_ids=tuple(EOS))
    for kw in ({"min_tokens": 1}, {"ignore_eos": True}):
        with pytest.raises(ValueError, match="structured"):
            RequestSpec.create(config, "r", [5, 6], _sampling('start: "a"'), max_tokens=4, **kw)


def test_device_unpacking_matches_the_host_one() -> None:
    import numpy as np

    from pagedserve.executor.structured import unpack_forbidden

    rng = np.random.default_rng(0)
    words = rng.integers(-(2**31), 2**31, size=(3, 5), dtype=np.int64).astype(np.int32)
    host = np.unpackbits(words.view(np.uint8), axis=1, bitorder="little")[:, :150] == 0
    assert torch.equal(unpack_forbidden(torch.from_numpy(words), 150), torch.from_numpy(host))


def test_rows_of_a_mixed_batch_are_masked_in_place(outputs: StructuredOutputs) -> None:
    """Constrained rows among free ones: each constrained row gets its own mask, the free rows'
    logits keep their exact values."""
    outputs.add("a", _sampling(choice(["yes", "no"], "x").grammar), [])
    outputs.add("b", _sampling(regex("[0-9]+", "x").grammar), [])
    logits = torch.randn(5, VOCAB)
    before = logits.clone()
    outputs.apply(logits, outputs.start(["free1", "a", "free2", "b", "free3"]))
    for row in (0, 2, 4):
        assert torch.equal(logits[row], before[row])
    alone = [_allowed(outputs, [rid])[0] for rid in ("a", "b")]
    for row, allowed in zip((1, 3), alone):
        kept = set(torch.nonzero(logits[row] > float("-inf")).flatten().tolist())
        assert kept == allowed and 0 < len(allowed) < VOCAB
        assert torch.equal(logits[row, sorted(kept)], before[row, sorted(kept)])
