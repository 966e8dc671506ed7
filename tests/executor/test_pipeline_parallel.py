"""Pipeline parallelism on the CPU over gloo (executor/pipeline_parallel.py): LLM(pipeline_parallel_size=M)
gives the tokens and (float32) logprobs of M=1 on every native architecture, with the step's
requests really cut into micro-batches, through chunked prefill, preemption, speculative drafts,
penalties and grammars, combined with tensor parallelism; each stage holds about 1/M of the
weights; what cannot run pipelined is refused; a dead rank of any stage fails the step naming it."""

from __future__ import annotations

import os
import re
import signal
import threading
import time

import pytest

from pagedserve import LLM, SamplingParams
from pagedserve.executor import pipeline_parallel
from pagedserve.executor.config import ExecutorConfig
from pagedserve.executor.loader import load_model
from pagedserve.executor.models.layer_loop import build_layer_loop
from pagedserve.executor.models.pipeline_stage import StageLayers
from pagedserve.executor.pipeline_parallel import split_micro_batches
from pagedserve.sampling_params import StructuredOutputsParams
from tests.conftest import model_dir
from tests.executor.same_outputs import assert_same_outputs

pytestmark = pytest.mark.timeout(180)

# different lengths (5 to 43 tokens), so a step's micro-batches differ in size
PROMPTS = ["def hello(x):", "import os\nimport sys\n",
           {"prompt_token_ids": [(13 * j) % 900 + 20 for j in range(43)]},
           "class Foo:\n    def __init__(self", {"prompt_token_ids": [7, 99, 31, 400, 12]}]
GREEDY = SamplingParams(max_tokens=10, temperature=0, logprobs=3)
SAMPLED = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=7, logprobs=1)
# the last request runs on alone for a few steps: one micro-batch then
PARAMS = [GREEDY, SAMPLED, GREEDY, SAMPLED,
          SamplingParams(max_tokens=14, temperature=0, logprobs=3, ignore_eos=True)]
LOGPROB_TOL = 1e-4  # float32: a micro-batch's GEMMs run over fewer rows


def _run(path, prompts, params, *, pp: int = 1, tp: int = 1, llm_hook=None, **kw):
    with LLM(str(path), dtype="float32", pipeline_parallel_size=pp, tensor_parallel_size=tp,
             **kw) as llm:
        if llm_hook is not None:
            llm_hook(llm)
        outs = llm.generate(prompts, params, use_tqdm=False)
        stats = llm.scheduler.stats()
        facts = {"weight_bytes": llm.executor.weight_bytes_per_rank(),
                 "preemptions": stats.num_preemptions, "accepted": stats.spec_accepted_tokens,
                 "drafts": stats.spec_draft_tokens}
    return [o.outputs[0] for o in outs], facts


def _assert_same(want: list, got: list) -> None:
    assert_same_outputs(want, got, LOGPROB_TOL)


def _count_micro_batches(monkeypatch) -> list[int]:
    """Rank 0's micro-batch count at each step (it runs stage 0 in this process)."""
    counts: list[int] = []

    def split(num_scheduled, max_parts):
        parts = split_micro_batches(num_scheduled, max_parts)
        counts.append(len(parts))
        return parts

    monkeypatch.setattr(pipeline_parallel, "split_micro_batches", split)
    return counts


def _assert_halves(whole: int, parts: list[int]) -> None:
    for part in parts:  # the embedding on stage 0, the LM head on stage 1, half the layers each
        assert 0.45 * whole <= part <= 0.55 * whole, (whole, parts)


# Every native architecture tensor parallelism is tested on (2 layers each at the micro size),
# and Mixtral: its experts cannot be sharded, but a stage holds whole layers.
ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "mixtral"]


@pytest.mark.parametrize("arch", ARCHS)
def test_two_stages_give_the_tokens_of_one(arch, monkeypatch):
    """The 43-token prompt is chunked (32 tokens a step), and 8 blocks cannot hold every request
    at once: some are preempted and recomputed."""
    path = model_dir(arch, "micro")
    kw = {"num_kv_blocks": 8, "max_num_batched_tokens": 32, "max_model_len": 128}
    want, one = _run(path, PROMPTS, PARAMS, **kw)
    counts = _count_micro_batches(monkeypatch)
    got, two = _run(path, PROMPTS, PARAMS, pp=2, **kw)
    _assert_same(want, got)
    assert one["preemptions"] > 0 and two["preemptions"] == one["preemptions"]
    assert max(counts) == 2 and min(counts) == 1, counts  # several requests split in two
    _assert_halves(one["weight_bytes"][0], two["weight_bytes"])  # qwen2's embedding is tied


@pytest.mark.parametrize("pp", [2, 3])
def test_stages_of_several_layers_and_a_middle_stage(pp):
    """4 layers: two stages of two, or three stages (2 + 1 + 1) with one in the middle, which
    receives and sends; through chunked prefill and preemption, the tokens of one stage."""
    path = model_dir("llama")
    prompts = [{"prompt_token_ids": [(7 * i + 31 * j) % 2000 + 10 for j in range(36 + 9 * i)]}
               for i in range(4)]
    params = SamplingParams(max_tokens=24, temperature=0, logprobs=2, ignore_eos=True)
    kw = {"num_kv_blocks": 12, "max_num_batched_tokens": 32, "max_model_len": 192}
    want, one = _run(path, prompts, params, **kw)
    got, staged = _run(path, prompts, params, pp=pp, **kw)
    assert one["preemptions"] > 0 and staged["preemptions"] == one["preemptions"]
    _assert_same(want, got)
    if pp == 2:
        _assert_halves(one["weight_bytes"][0], staged["weight_bytes"])


def test_tensor_and_pipeline_parallel_together():
    """TP=2 x PP=2: ranks 0, 1 are stage 0 and 2, 3 stage 1, each a quarter of the weights."""
    path = model_dir("llama", "micro")
    want, one = _run(path, PROMPTS, PARAMS, num_kv_blocks=64)
    got, four = _run(path, PROMPTS, PARAMS, pp=2, tp=2, num_kv_blocks=64)
    _assert_same(want, got)
    (whole,), quarters = one["weight_bytes"], four["weight_bytes"]
    assert len(quarters) == 4
    for part in quarters:
        assert 0.22 * whole <= part <= 0.28 * whole, (whole, quarters)


def test_drafts_penalties_and_grammars_across_stages():
    """Per-request state the executor keeps: speculative drafts (verified on the last stage,
    accepted on every one), penalties over the outputs so far, and a grammar's matcher; the
    tokens of one stage without speculation."""
    from tests.llm.test_speculative import SPEC, Oracle

    path = model_dir("llama", "micro")
    prompts = PROMPTS[:4]
    params = [
        SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=0.7, top_p=0.9, seed=4, max_tokens=16, ignore_eos=True,
                       presence_penalty=0.6, frequency_penalty=0.3, repetition_penalty=1.3),
        SamplingParams(temperature=1.0, seed=3, max_tokens=16, min_tokens=8,
                       logit_bias={5: 2.0}),
        SamplingParams(temperature=0.8, seed=5, max_tokens=16,
                       structured_outputs=StructuredOutputsParams(regex=r"[a-z]{3,12}")),
    ]
    with LLM(str(path), dtype="float32", num_kv_blocks=128) as llm:
        plain = llm.generate(prompts, params, use_tqdm=False)
    runs = [o.prompt_token_ids + o.outputs[0].token_ids for o in plain]

    def oracle(llm: LLM) -> None:  # proposes the right continuation, and sometimes a wrong one
        llm.scheduler.speculator.propose = Oracle(runs, llm.executor.model_config.vocab_size)

    got, facts = _run(path, prompts, params, pp=2, num_kv_blocks=128, speculative_config=SPEC,
                      llm_hook=oracle)
    assert [g.token_ids for g in got] == [o.outputs[0].token_ids for o in plain]
    assert 0 < facts["accepted"] < facts["drafts"]  # drafts accepted, and some rejected
    assert re.fullmatch(r"[a-z]{3,12}", got[3].text), got[3].text


def test_stage_layers():
    """L // M layers a stage, the first L % M one more; which checkpoint tensors each loads."""
    assert [StageLayers.of(5, s, 2).layers for s in range(2)] == [range(0, 3), range(3, 5)]
    assert [StageLayers.of(4, s, 3).layers for s in range(3)] == [range(0, 2), range(2, 3),
                                                                  range(3, 4)]
    first, last = StageLayers.of(4, 0, 2), StageLayers.of(4, 1, 2)
    assert first.holds("model.layers.1.mlp.down_proj.weight", tied=False)
    assert not first.holds("model.layers.2.mlp.down_proj.weight", tied=False)
    assert not first.holds("lm_head.weight", tied=False) and last.holds("model.norm.weight", False)
    assert not last.holds("model.embed_tokens.weight", tied=False)
    assert last.holds("model.embed_tokens.weight", tied=True)  # it is the LM head
    with pytest.raises(ValueError, match="pipeline_parallel_size: 3 stages for 2 layers"):
        StageLayers.of(2, 0, 3)


@pytest.mark.parametrize(("counts", "parts", "want"), [
    ([9], 2, [[0]]),  # one request: one micro-batch
    ([3, 3, 3, 3], 2, [[0, 1], [2, 3]]),
    ([100, 1, 1, 1], 2, [[0], [1, 2, 3]]),
    ([1, 1, 1, 100], 2, [[0, 1, 2], [3]]),
    ([1, 1, 1], 3, [[0], [1], [2]]),
    ([5, 1], 4, [[0], [1]]),  # never more micro-batches than requests
    ([1, 1, 1, 1, 1, 1], 4, [[0, 1], [2], [3, 4], [5]]),
])
def test_micro_batches_keep_requests_whole(counts, parts, want):
    got = split_micro_batches(counts, parts)
    assert [list(mb.requests) for mb in got] == want
    starts = [0, *[sum(counts[: i + 1]) for i in range(len(counts))]]
    assert [mb.tokens for mb in got] == [range(starts[r[0]], starts[r[-1] + 1]) for r in want]


def test_a_stage_short_of_the_whole_model_keeps_the_module_path():
    """The layer loop (one C call over every layer, ending in the final norm) is refused for a
    stage, which runs its layers module by module."""
    from pagedserve.executor.kv_cache import KVCache

    model, mc = load_model(model_dir("llama", "micro"), dtype="float32", pp_rank=0, pp_size=2)
    cache = KVCache(1, 4, 16, mc.num_kv_heads, mc.head_dim, model.model.layers[0].input_layernorm
                    .weight.dtype, "cpu")
    loop, why = build_layer_loop(model, cache)
    if model.backend.__name__ != "pagedserve.kernels.cpu":
        pytest.skip(f"no CPU kernels here ({why})")
    assert loop is None and "pipeline parallelism" in why


@pytest.mark.parametrize("value", [0, -2, 1.5, True, "2"])
def test_bad_pipeline_parallel_size_is_refused(value):
    with pytest.raises(ValueError, match="pipeline_parallel_size"):
        ExecutorConfig(model="m", pipeline_parallel_size=value)


@pytest.mark.parametrize(("field", "kw"), [
    ("draft model", {"draft_model": "m"}),
    ("batch_invariant", {"batch_invariant": True}),
    ("quantization", {"quantization": "awq"}),
])
def test_unsupported_combinations_are_refused(field, kw):
    with pytest.raises(ValueError, match=f"pipeline_parallel_size.*{field}"):
        ExecutorConfig(model="m", pipeline_parallel_size=2, **kw)


@pytest.mark.parametrize(("arch", "pp", "what"), [
    ("llama", 3, "3 stages for 2 layers"),
    ("gpt2", 2, "transformers implementation"),
])
def test_models_that_cannot_be_cut_are_refused(arch, pp, what):
    """Refused from the config alone, before any rank starts."""
    with pytest.raises(ValueError, match=f"pipeline_parallel_size.*{what}"):
        LLM(str(model_dir(arch, "micro")), dtype="float32", pipeline_parallel_size=pp)


def test_quantized_checkpoint_is_refused(tmp_path):
    from pagedserve.executor.quantization.quantize import quantize_model

    quantized = quantize_model(model_dir("llama", "micro"), tmp_path / "int8", "int8")
    with pytest.raises(ValueError, match=r"pipeline_parallel_size.*quantized checkpoint"):
        LLM(str(quantized), dtype="float32", pipeline_parallel_size=2)


def test_a_dead_last_stage_fails_the_step_loudly():
    path = model_dir("llama", "micro")
    with LLM(str(path), dtype="float32", pipeline_parallel_size=2, num_kv_blocks=16) as llm:
        proc = llm.executor.ranks.procs[0]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        with pytest.raises(RuntimeError, match="rank 1 died"):
            llm.generate(PROMPTS[:2], GREEDY, use_tqdm=False)


def test_a_rank_that_dies_mid_step_behind_a_live_one_is_named():
    """TP=2 x PP=2, rank 3 (stage 1) stopped mid-step, then killed: rank 2 fails its all-reduce
    and goes back to wait for a plan, so the samples rank 0 waits for never come; rank 0 names
    the dead rank rather than hanging."""
    path = model_dir("llama", "micro")
    with LLM(str(path), dtype="float32", pipeline_parallel_size=2, tensor_parallel_size=2,
             num_kv_blocks=16) as llm:
        pid = llm.executor.ranks.procs[2].pid  # rank 3
        os.kill(pid, signal.SIGSTOP)

        def kill_soon():
            time.sleep(0.5)
            os.kill(pid, signal.SIGKILL)

        threading.Thread(target=kill_soon, daemon=True).start()
        start = time.monotonic()
        with pytest.raises(RuntimeError, match="rank 3 died"):
            llm.generate(PROMPTS[:2], GREEDY, use_tqdm=False)
        assert time.monotonic() - start < 30
