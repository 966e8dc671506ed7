"""Tensor parallelism on the CPU over gloo (executor/tensor_parallel.py): LLM(tensor_parallel_size=N)
gives the tokens and (float32) logprobs of N=1, with each rank holding about 1/N of the weights, and
the ranks' processes end with the LLM."""

from __future__ import annotations

import gc
import os
import signal
import threading
import time

import pytest
import torch

from pagedserve import LLM, SamplingParams
from pagedserve.executor import tensor_parallel as tp
from pagedserve.executor.config import ExecutorConfig
from pagedserve.executor.tensor_parallel import HEADER_BYTES
from pagedserve.protos import executor_pb2
from tests.conftest import model_dir
from tests.executor.same_outputs import assert_same_outputs

pytestmark = pytest.mark.timeout(180)

PROMPTS = ["def hello(x):", "import os\nimport sys\n", "class Foo:\n    def __init__(self"]
GREEDY = SamplingParams(max_tokens=12, temperature=0, logprobs=3)
# every rank samples from the same gathered logits with the same generator: the same tokens
SAMPLED = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=7, logprobs=1)
LOGPROB_TOL = 1e-4  # float32: the all-reduce sums the heads' and MLP columns' parts in another order


def _run(path, tp: int, prompts, params, **kw) -> tuple[list, dict]:
    with LLM(str(path), dtype="float32", tensor_parallel_size=tp, **kw) as llm:
        outs = llm.generate(prompts, params)
        facts = {"weight_bytes": llm.executor.weight_bytes_per_rank(),
                 "preemptions": llm.scheduler.stats().num_preemptions}
    return [o.outputs[0] for o in outs], facts


def _assert_same(want: list, got: list) -> None:
    assert_same_outputs(want, got, LOGPROB_TOL)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


# Every native dense architecture (micro: 4 heads, 2 KV heads): llama at 4 ranks (each KV head
# replicated on two), the others at 2 (mistral: a 16-token sliding window; gemma2: soft-capped scores
# and logits; qwen3: explicit head_dim, q/k norms, tied embeddings; phi3: fused checkpoint qkv /
# gate_up cut on the way in). The tiny llama runs below, chunked and preempted.
CASES = [("llama", "micro", 4), ("mistral", "micro", 2), ("qwen2", "micro", 2), ("qwen3", "micro", 2),
         ("gemma2", "micro", 2), ("gemma3_text", "micro", 2), ("phi3", "micro", 2)]


@pytest.mark.parametrize(("arch", "preset", "tp"), CASES, ids=[f"{a}-tp{t}" for a, _, t in CASES])
def test_sharded_tokens_match_one_rank(arch, preset, tp):
    path = model_dir(arch, preset)
    prompts, params = PROMPTS * 2, [GREEDY] * len(PROMPTS) + [SAMPLED] * len(PROMPTS)
    want, _ = _run(path, 1, prompts, params, num_kv_blocks=64)
    got, facts = _run(path, tp, prompts, params, num_kv_blocks=64)
    _assert_same(want, got)
    assert len(facts["weight_bytes"]) == tp


def test_chunked_prefill_and_preemption_match_one_rank():
    """Prompts longer than the step's token budget (chunked prefill) and a KV pool too small for
    all of them at once (preemption, then recompute): the same tokens as one rank, with each
    rank holding about half the weights."""
    path = model_dir("llama")
    prompts = [{"prompt_token_ids": [(7 * i + 31 * j) % 2000 + 10 for j in range(36 + 9 * i)]}
               for i in range(4)]
    params = SamplingParams(max_tokens=24, temperature=0, logprobs=2, ignore_eos=True)
    kw = {"num_kv_blocks": 12, "max_num_batched_tokens": 32, "max_model_len": 192}
    want, one = _run(path, 1, prompts, params, **kw)
    got, two = _run(path, 2, prompts, params, **kw)
    assert one["preemptions"] > 0 and two["preemptions"] == one["preemptions"]
    _assert_same(want, got)
    (whole,), halves = one["weight_bytes"], two["weight_bytes"]
    for part in halves:  # 1/2 of everything (vocabulary rows included); the norms are replicated
        assert 0.49 * whole <= part <= 0.52 * whole, (whole, halves)


def test_ranks_exit_when_the_llm_is_closed_or_deleted():
    path = model_dir("llama")
    llm = LLM(str(path), dtype="float32", tensor_parallel_size=2, num_kv_blocks=16)
    pids = [p.pid for p in llm.executor.ranks.procs]
    assert pids and all(_alive(pid) for pid in pids)
    llm.generate(PROMPTS[:1], GREEDY)
    del llm
    gc.collect()
    assert not any(_alive(pid) for pid in pids)


def test_a_dead_rank_fails_the_step_loudly():
    path = model_dir("llama")
    with LLM(str(path), dtype="float32", tensor_parallel_size=2, num_kv_blocks=16) as llm:
        proc = llm.executor.ranks.procs[0]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        with pytest.raises(RuntimeError, match="tensor-parallel rank 1 died"):
            llm.generate(PROMPTS[:1], GREEDY)
        with pytest.raises(RuntimeError, match="rank 1 died"):  # and every step after
            llm.executor.execute(executor_pb2.StepPlan(step_id=1000))
    assert proc.poll() is not None


def test_a_rank_that_dies_mid_step_is_named():
    """A rank killed while rank 0 waits in a collective: the step raises, naming it."""
    path = model_dir("llama")
    with LLM(str(path), dtype="float32", tensor_parallel_size=2, num_kv_blocks=16) as llm:
        proc = llm.executor.ranks.procs[0]
        os.kill(proc.pid, signal.SIGSTOP)  # it hangs in the step, then dies
        pid = proc.pid

        def kill_soon():
            time.sleep(0.5)
            os.kill(pid, signal.SIGKILL)

        threading.Thread(target=kill_soon, daemon=True).start()
        with pytest.raises(RuntimeError, match="rank 1 died"):
            llm.generate(PROMPTS[:1], GREEDY)


def test_gguf_file_runs_sharded_dense(tmp_path):
    """A GGUF file's weights (Q8_0 here) load dense with quantization='dequantize', and shard;
    run quantized, they are refused."""
    from gguf import GGMLQuantizationType

    from tests.gguf.hf_to_gguf import convert

    gguf_file = convert(model_dir("llama", "micro"), tmp_path / "m.gguf", GGMLQuantizationType.Q8_0)
    want, _ = _run(gguf_file, 1, PROMPTS, GREEDY, num_kv_blocks=32, quantization="dequantize")
    got, _ = _run(gguf_file, 2, PROMPTS, GREEDY, num_kv_blocks=32, quantization="dequantize")
    _assert_same(want, got)
    with pytest.raises(ValueError, match=r"tensor_parallel_size.*dequantize"):
        LLM(str(gguf_file), dtype="float32", tensor_parallel_size=2)


def test_quantized_checkpoint_is_refused(tmp_path):
    from pagedserve.executor.quantization.quantize import quantize_model

    quantized = quantize_model(model_dir("llama", "micro"), tmp_path / "int8", "int8")
    with pytest.raises(ValueError, match=r"tensor_parallel_size.*quantized checkpoint"):
        LLM(str(quantized), dtype="float32", tensor_parallel_size=2)


@pytest.mark.parametrize("size", [0, 1, 100, HEADER_BYTES - 8, HEADER_BYTES - 7, 3 * HEADER_BYTES])
def test_plan_messages_round_trip(monkeypatch, size):
    """Rank 0's broadcasts, replayed to a receiving rank: the same bytes (one broadcast up to the
    header's room, two past it), and the stop message."""
    sent: list[torch.Tensor] = []
    monkeypatch.setattr(tp.dist, "broadcast", lambda t, src: sent.append(t.clone()))
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    tp.send_message(torch.zeros(HEADER_BYTES, dtype=torch.uint8), payload)
    tp.send_message(torch.zeros(HEADER_BYTES, dtype=torch.uint8), None)
    assert len(sent) == (3 if size > HEADER_BYTES - 8 else 2)
    replay = iter(sent)
    monkeypatch.setattr(tp.dist, "broadcast", lambda t, src: t.copy_(next(replay)))
    header = torch.zeros(HEADER_BYTES, dtype=torch.uint8)
    assert tp.receive_message(header) == payload
    assert tp.receive_message(header) is None


@pytest.mark.parametrize("value", [0, -2, 1.5, True, "2"])
def test_bad_tensor_parallel_size_is_refused(value):
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        ExecutorConfig(model="m", tensor_parallel_size=value)


@pytest.mark.parametrize(("arch", "preset", "tp", "what"), [
    ("llama", "tiny", 3, "num_attention_heads"),  # 4 heads
    ("llama", "tiny", 8, "num_attention_heads"),
    ("mixtral", "micro", 2, "experts"),
    ("gpt2", "micro", 2, "transformers implementation"),
])
def test_models_that_cannot_be_sharded_are_refused(arch, preset, tp, what):
    """Refused from the config alone, before any rank starts."""
    with pytest.raises(ValueError, match=f"tensor_parallel_size.*{what}"):
        LLM(str(model_dir(arch, preset)), dtype="float32", tensor_parallel_size=tp)


@pytest.mark.parametrize(("field", "kw"), [
    ("draft model", {"draft_model": "m"}),
    ("batch_invariant", {"batch_invariant": True}),
    ("quantization", {"quantization": "awq"}),
])
def test_unsupported_combinations_are_refused(field, kw):
    with pytest.raises(ValueError, match=f"tensor_parallel_size.*{field}"):
        ExecutorConfig(model="m", tensor_parallel_size=2, **kw)
