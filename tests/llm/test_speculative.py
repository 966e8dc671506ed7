"""Speculative decoding is exact: every request gives the tokens (and logprobs) it gives without
speculation, whatever is proposed.

A random-weight model never repeats itself, so prompt lookup would propose nothing here; the tests
swap in an oracle proposer that knows each request's tokens from a run without speculation and
proposes them with deliberate mistakes (so drafts are accepted whole, in part and not at all).
The real model's prompt lookup is tested in tests/gguf/test_speculative_real.py.
"""

from __future__ import annotations

import pytest

from pagedserve import LLM, SamplingParams
from pagedserve.executor import executor as executor_module
from pagedserve.scheduler.speculative_config import SpeculativeConfig
from tests.conftest import model_dir

SPEC = {"method": "ngram", "num_speculative_tokens": 4}
PROMPTS = ["The quick brown fox", "def main():\n    return 1", "Once upon a time, in a land",
           "1 2 3 4 5 6 7 8", "Hello"]


def llm(**options) -> LLM:
    return LLM(model_dir("llama"), dtype="float32", **{"num_kv_blocks": 256, **options})


def params() -> list[SamplingParams]:
    """Greedy and seeded sampling with every rule that reads the outputs so far."""
    return [
        SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=1.0, seed=3, max_tokens=30, ignore_eos=True, logprobs=0),
        SamplingParams(temperature=0.7, top_p=0.9, top_k=50, seed=4, max_tokens=30,
                       presence_penalty=0.6, frequency_penalty=0.3, repetition_penalty=1.3),
        SamplingParams(temperature=1.5, min_p=0.05, seed=5, max_tokens=30, min_tokens=12),
        SamplingParams(temperature=0.8, seed=6, max_tokens=7, logit_bias={5: 2.0}),
    ]


class Oracle:
    """Proposes each request's known continuation, wrong at some positions."""

    def __init__(self, runs: list[list[int]], vocab_size: int) -> None:
        self.runs, self.vocab_size = runs, vocab_size
        self.calls = 0

    def __call__(self, tokens: list[int], config: SpeculativeConfig, k: int) -> list[int]:
        self.calls += 1
        run = next((r for r in self.runs if r[:len(tokens)] == tokens), None)
        if run is None:
            return []
        drafts = run[len(tokens):len(tokens) + min(k, config.num_speculative_tokens)]
        # every third step's proposal has its third token wrong, every fifth its first
        wrong = {2} if self.calls % 3 == 0 else {0} if self.calls % 5 == 0 else set()
        return [(t + 1) % self.vocab_size if j in wrong else t for j, t in enumerate(drafts)]


def run_both(prompts: list[str], sps: list[SamplingParams], **options):
    plain = llm(**options).generate(prompts, sps)
    runs = [o.prompt_token_ids + c.token_ids for o in plain for c in o.outputs]
    spec = llm(speculative_config=SPEC, **options)
    spec.scheduler.speculator.propose = Oracle(runs, spec.executor.model_config.vocab_size)
    return plain, spec.generate(prompts, sps), spec


def assert_same(plain, spec) -> None:
    for a, b in zip(plain, spec, strict=True):
        for x, y in zip(a.outputs, b.outputs, strict=True):
            assert y.token_ids == x.token_ids, a.prompt
            assert y.finish_reason == x.finish_reason
            if x.logprobs is not None:
                for lx, ly in zip(x.logprobs, y.logprobs, strict=True):
                    assert lx.keys() == ly.keys()
                    assert all(abs(lx[t] - ly[t]) < 1e-4 for t in lx)


def test_outputs_equal_those_without_speculation() -> None:
    plain, spec, engine = run_both(PROMPTS, params())
    assert_same(plain, spec)
    stats = engine.scheduler.stats()
    # the oracle's mistakes leave some drafts rejected; most are accepted
    assert 0 < stats.spec_accepted_tokens < stats.spec_draft_tokens
    assert stats.spec_verifications > 0


def test_exact_under_preemption_chunked_prefill_and_prefix_hits() -> None:
    """A pool too small for the batch (preemptions), prompts chunked by a small token budget,
    shared prompts (prefix-cache hits) and n = 2 seeded children."""
    shared = "A shared system prompt that fills more than one block of sixteen tokens. "
    prompts = [shared + p for p in PROMPTS]
    sps = params()
    sps[1] = SamplingParams(n=2, temperature=1.0, seed=8, max_tokens=30, ignore_eos=True)
    plain, spec, engine = run_both(prompts, sps, num_kv_blocks=12, max_num_batched_tokens=24,
                                   max_num_seqs=8)
    assert_same(plain, spec)
    stats = engine.scheduler.stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
    assert stats.spec_accepted_tokens > 0


def test_stop_token_inside_accepted_drafts() -> None:
    """A stop token id and max_tokens that fall inside a step's accepted drafts end the output at
    that token, as without speculation."""
    (probe,) = llm().generate(["The quick brown fox"], SamplingParams(temperature=0, max_tokens=20,
                                                                      ignore_eos=True))
    stop = probe.outputs[0].token_ids[9]
    sps = [SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop]),
           SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)]
    plain, spec, _ = run_both(["The quick brown fox", "The quick brown fox"], sps)
    assert plain[0].outputs[0].token_ids[-1] == stop
    assert_same(plain, spec)


def test_rows_that_forget_the_drafts_before_them_fail_the_equality(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The test of the tests: sampling every draft row as if no draft preceded it (the seeded
    uniform's output position, penalties and min_tokens all one step behind) must change the
    outputs of seeded requests."""
    real = executor_module.sample_rows

    def forgetful(scheduled, samples, drafts):
        rows = real(scheduled, samples, drafts)
        rows.views = [state for state, ds in zip(rows.states, rows.drafts)
                      for _ in range(len(ds) + 1)]
        return rows

    monkeypatch.setattr(executor_module, "sample_rows", forgetful)
    plain, spec, _ = run_both(PROMPTS[:2], params()[1:3])
    assert any(a.outputs[0].token_ids != b.outputs[0].token_ids for a, b in zip(plain, spec))


def test_an_output_that_does_not_answer_the_drafts_is_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An executor that accepted drafts its samples contradict is caught by the scheduler."""
    monkeypatch.setattr(executor_module, "num_accepted", lambda drafts, sampled: len(drafts))
    with pytest.raises(RuntimeError, match="does not answer the drafts"):
        run_both(PROMPTS[:2], params()[:2])


def test_bad_speculative_config_is_a_value_error_naming_the_field() -> None:
    cases = [({"method": "eagle"}, "method"), ({"num_speculative_tokens": 0},
                                               "num_speculative_tokens"),
             ({"prompt_lookup_min": 5, "prompt_lookup_max": 3}, "prompt_lookup_min"),
             ({"model": "x"}, r"speculative_config\.model"), ({"draft": "x"}, "unknown field"),
             ("{not json", "not valid JSON")]
    for value, needle in cases:
        with pytest.raises(ValueError, match=needle):
            SpeculativeConfig.parse(value)


def tokens_across_an_executor_restart(engine: LLM, plain: list, sps: list,
                                      stat: str) -> list[list[int]]:
    """Each of plain's prompts run on `engine` step by step, its executor replaced by a fresh one
    after 6 steps (the scheduler requeues every request with its outputs, as when the executor
    is lost); the stats counter `stat` must be positive by then. The tokens of each request."""
    from pagedserve.executor.executor import Executor
    from pagedserve.scheduler.driver import StepDriver

    tokens: dict[str, list[int]] = {}
    for i, (out, sp) in enumerate(zip(plain, sps)):
        engine.scheduler.add_request(str(i), out.prompt_token_ids, sp.to_proto(),
                                     max_tokens=sp.max_tokens, min_tokens=sp.min_tokens,
                                     ignore_eos=sp.ignore_eos)
        tokens[str(i)] = []
    driver, steps = engine.driver, 0
    while engine.scheduler.has_unfinished():
        if steps == 6:  # mid-generation, with speculation under way
            assert getattr(engine.scheduler.stats(), stat) > 0, stat
            engine.scheduler.reset_executor_state()
            driver = StepDriver(engine.scheduler, Executor(engine.executor.config))
        for delta in driver.step():
            tokens[delta.request_id] += delta.new_token_ids
        steps += 1
    return [tokens[str(i)] for i in range(len(plain))]


def test_exact_across_an_executor_restart() -> None:
    """Speculating requests that lose their executor mid-generation (the scheduler requeues them
    with their outputs, a fresh executor recomputes them) end with the tokens of a run with no
    restart and no speculation."""
    sps = params()[:3]
    plain = llm().generate(PROMPTS[:3], sps)
    runs = [o.prompt_token_ids + c.token_ids for o in plain for c in o.outputs]
    engine = llm(speculative_config=SPEC)
    engine.scheduler.speculator.propose = Oracle(runs, engine.executor.model_config.vocab_size)
    assert tokens_across_an_executor_restart(engine, plain, sps, "spec_accepted_tokens") == [
        o.outputs[0].token_ids for o in plain]
