"""The Executor, driven through the step contract by the harness, against transformers.

For each tiny architecture, 8 prompts of 1 to 230 tokens (stdlib source text) run batched in one
executor in float32: greedy tokens must equal transformers' greedy generate on the same weights, and
the top-5 logprobs must be within 1e-3 of transformers' log_softmax of its raw logits. Variants:
whole-prompt prefill, chunked prefill with another block size, preemption and recompute (forget,
then re-send with the outputs so far), and a prefix-cache hit (a request starting on cached blocks).

Both sides mask EOS until N outputs (transformers: min_new_tokens=N; ours: min_tokens=N), so both
pick the same argmax. At the first token where the two disagree, the prompt still counts as
matching if it is a near-tie (tests/hf_reference.py's rule: each side's token among the other's two
best, transformers' logprobs of the two within 0.02); the comparison of that prompt stops there,
and a test may end at most a quarter of its prompts that way (hf_reference.NEAR_TIES).
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from pagedserve.executor.config import ExecutorConfig
from pagedserve.executor.executor import Executor
from pagedserve.executor.kv_cache import KVCache
from pagedserve.protos import executor_pb2
from tests.executor.harness import Completion, Harness
from tests.hf_reference import NEAR_TIES, assert_near_tie

LENGTHS = (1, 3, 16, 17, 40, 64, 129, 230)
N = 33  # tokens per prompt: one from the prefill, then 32 decode steps
TOP = 5
TOL = 1e-3  # logprob error allowed
NUM_BLOCKS = 512


@dataclass
class Reference:
    prompt: list[int]
    tokens: list[int]
    logprobs: torch.Tensor  # [N, V] float32: log_softmax of transformers' raw logits


def stdlib_prompts(tokenizer) -> list[list[int]]:
    """BOS plus a slice of tokenised stdlib source, one per length, at different offsets."""
    text = Path(sysconfig.get_paths()["stdlib"], "textwrap.py").read_text()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    return [[bos, *ids[37 * i : 37 * i + n - 1]] for i, n in enumerate(LENGTHS)]


_REFERENCES: dict[Path, list[Reference]] = {}


def hf_generate(path: Path, prompts: list[list[int]]) -> list[Reference]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    refs = []
    for prompt in prompts:
        with torch.no_grad():
            out = model.generate(
                torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                do_sample=False, max_new_tokens=N, min_new_tokens=N, output_logits=True,
                return_dict_in_generate=True, pad_token_id=model.config.pad_token_id,
            )
        logprobs = torch.log_softmax(torch.cat(out.logits).float(), dim=-1)
        refs.append(Reference(prompt, out.sequences[0, len(prompt):].tolist(), logprobs))
    return refs


@pytest.fixture
def references(tiny_model) -> list[Reference]:
    """transformers' greedy outputs for the 8 prompts, computed once per architecture."""
    if tiny_model not in _REFERENCES:
        from transformers import AutoTokenizer

        prompts = stdlib_prompts(AutoTokenizer.from_pretrained(tiny_model))
        _REFERENCES[tiny_model] = hf_generate(tiny_model, prompts)
    return _REFERENCES[tiny_model]


def greedy(min_tokens: int = N) -> executor_pb2.SamplingParams:
    return executor_pb2.SamplingParams(temperature=0.0, logprobs=TOP, min_tokens=min_tokens)


def make_executor(path: Path, block_size: int = 16, **kw) -> Executor:
    return Executor(ExecutorConfig(model=str(path), dtype="float32", block_size=block_size,
                                   num_kv_blocks=NUM_BLOCKS, **kw))


def compare(ours: Completion, ref: Reference) -> tuple[float, int]:
    """Assert ours matches ref (see the module docstring); returns the largest logprob error and
    the number of tokens compared (N, or fewer after a near-tie)."""
    NEAR_TIES.compared += 1
    worst = 0.0
    for t, (mine, theirs) in enumerate(zip(ours.tokens, ref.tokens)):
        lp = ref.logprobs[t]
        top_ids, top_lps = ours.top[t]
        if mine != theirs:
            assert_near_tie(t, mine, theirs, lp, dict(zip(top_ids, top_lps)), len(ref.prompt))
            NEAR_TIES.ended_early += 1
            return worst, t  # a near-tie: the continuations may differ from here on
        errors = [abs(float(lp[i]) - x) for i, x in zip(top_ids, top_lps)]
        errors.append(abs(float(lp[mine]) - ours.logprobs[t]))
        # Our top 5 is transformers' top 5: its 5th best is no better than ours.
        errors.append(max(0.0, float(lp.topk(TOP).values[-1]) - top_lps[-1]))
        worst = max(worst, *errors)
        assert worst < TOL, f"token {t} of a {len(ref.prompt)}-token prompt: logprob error {worst:.2e}"
        assert sorted(top_lps, reverse=True) == top_lps
    assert len(ours.tokens) == N
    return worst, N


def run_all(harness: Harness, refs: list[Reference], **add_kw) -> dict[str, Completion]:
    for i, ref in enumerate(refs):
        harness.add(f"p{i}", ref.prompt, greedy(), max_tokens=N, **add_kw)
    return harness.run()


# ---- the comparisons --------------------------------------------------------------------------


def check_all(outs: dict[str, Completion], refs: list[Reference], what: str) -> None:
    results = [compare(outs[f"p{i}"], ref) for i, ref in enumerate(refs)]
    ties = sum(n < N for _, n in results)
    print(f"{what}: max logprob error {max(w for w, _ in results):.2e}, near-ties {ties}/{len(refs)}")


def test_whole_prompt_prefill_batched(tiny_model, references):
    outs = run_all(Harness(make_executor(tiny_model)), references)
    check_all(outs, references, f"{tiny_model.name}, whole prefill, block 16")


def test_chunked_prefill_other_block_size(tiny_model, references):
    # Chunks of 16 / 7 / 40 tokens, not aligned to the 8-token blocks; short prompts finish their
    # prefill while long ones are still in chunks, so steps mix prompt chunks and decode tokens.
    outs = run_all(Harness(make_executor(tiny_model, block_size=8), seed=1), references,
                   chunk_sizes=[16, 7, 40])
    check_all(outs, references, f"{tiny_model.name}, chunked prefill, block 8")


def test_forget_and_resume_by_recompute(tiny_model, references):
    """Preempted requests are forgotten and re-sent whole with their outputs: same greedy tokens."""
    harness = Harness(make_executor(tiny_model, block_size=32), seed=2)
    for i, ref in enumerate(references):
        harness.add(f"p{i}", ref.prompt, greedy(), max_tokens=N,
                    preempt_at=(1, 10, 20) if i % 2 else (), chunk_sizes=64)
    check_all(harness.run(), references, f"{tiny_model.name}, preempted, block 32")


def test_prefix_cache_hit(tiny_model, references):
    """A request starts on another's cached blocks (num_computed_tokens > 0) and computes the rest."""
    donor, tail = references[7].prompt, references[6].prompt[1:40]
    prompt = donor[:96] + tail  # 96 = 6 whole blocks of 16 shared with the donor
    ref = hf_generate(tiny_model, [prompt])[0]
    harness = Harness(make_executor(tiny_model))
    harness.add("donor", donor, greedy(), max_tokens=2, keep_blocks=True)
    harness.run()
    harness.add("hit", prompt, greedy(), max_tokens=N, prefix_of="donor", num_cached=96)
    compare(harness.run()["hit"], ref)


# ---- seeded sampling, describe, config and plan validation (cheap; one architecture) --------------


def test_seeded_sampling_alone_batched_preempted_and_restarted(tiny_llama):
    """A seeded request draws the same tokens alone, in a batch (at another row, with unseeded
    neighbours), and when preempted and recomputed in a second executor (a restart)."""
    prompt = list(range(100, 140))
    seeded = executor_pb2.SamplingParams(temperature=1.0, top_p=0.9, seed=1234, logprobs=2)
    alone = Harness(make_executor(tiny_llama))
    alone.add("s", prompt, seeded, max_tokens=20)
    want = alone.run()["s"]
    batched = Harness(make_executor(tiny_llama, block_size=8), seed=3)
    for i in range(3):
        batched.add(f"u{i}", prompt[i:], executor_pb2.SamplingParams(temperature=1.0), max_tokens=20)
    batched.add("s", prompt, seeded, max_tokens=20, preempt_at=(5, 6, 13), chunk_sizes=9)
    got = batched.run()
    assert got["s"].tokens == want.tokens
    assert got["s"].logprobs == pytest.approx(want.logprobs, abs=1e-4)
    assert len(set(want.tokens)) > 5, "temperature 1 over a random model should wander"
    assert any(got[f"u{i}"].tokens != want.tokens for i in range(3))


def test_describe_sizes_the_cache_from_the_budget(tiny_llama):
    ex = Executor(ExecutorConfig(model=str(tiny_llama), dtype="float32", kv_cache_memory_bytes=10 << 20))
    mc = ex.model_config
    per_block = KVCache.bytes_per_block(mc.num_layers, 16, mc.num_kv_heads, mc.head_dim, torch.float32)
    d = ex.describe()
    assert d.num_kv_blocks == (10 << 20) // per_block
    assert (d.architecture, d.dtype, d.block_size, d.device) == ("LlamaForCausalLM", "float32", 16, "cpu")
    assert (d.vocab_size, d.max_model_len, list(d.eos_token_ids)) == (2048, 2048, [1, 3])
    assert (d.num_layers, d.num_kv_heads, d.head_dim) == (mc.num_layers, mc.num_kv_heads, mc.head_dim)


@pytest.mark.parametrize("field,value", [
    ("block_size", 12), ("block_size", 256), ("max_num_seqs", 0), ("max_num_batched_tokens", -1),
    ("num_kv_blocks", 0), ("kv_cache_memory_bytes", 0), ("max_model_len", 0), ("seed", -1),
    ("dtype", "int8"), ("device", "tpu"), ("model", ""),
])
def test_config_rejects_bad_values_naming_the_field(field, value):
    kw = {"model": "m", field: value}
    with pytest.raises(ValueError, match=rf"^{field}: "):
        ExecutorConfig(**kw)


def new(rid="a", prompt=(5, 6, 7), blocks=(0,), computed=0, scheduled=3, **kw):
    return executor_pb2.NewRequest(request_id=rid, prompt_token_ids=list(prompt), sampling=greedy(0),
                                   block_ids=list(blocks), num_computed_tokens=computed,
                                   num_scheduled_tokens=scheduled, **kw)


def plan(*, new_requests=(), continuing=(), forget=()):
    return executor_pb2.StepPlan(step_id=1, new_requests=list(new_requests),
                                 continuing_requests=list(continuing), forget_request_ids=list(forget))


def cont(rid="a", blocks=(), scheduled=1):
    return executor_pb2.ContinuingRequest(request_id=rid, new_block_ids=list(blocks),
                                          num_scheduled_tokens=scheduled)


@pytest.fixture(scope="module")
def small_executor(tiny_llama):
    return make_executor(tiny_llama, max_model_len=64, max_num_seqs=4)


@pytest.mark.parametrize("bad,match", [
    (plan(continuing=[cont("ghost")]), r"'ghost': request_id is not held"),
    (plan(new_requests=[new(prompt=range(20), scheduled=20)]), r"'a': block_ids: 1 blocks"),
    (plan(new_requests=[new(scheduled=4)]), r"'a': num_scheduled_tokens 4 .* holds 3"),
    (plan(new_requests=[new(computed=2, scheduled=2)]), r"'a': num_scheduled_tokens 2 .* holds 3"),
    (plan(new_requests=[new(scheduled=0)]), r"'a': num_scheduled_tokens must be >= 1"),
    (plan(new_requests=[new(), new()]), r"'a': request_id is already held"),
    (plan(new_requests=[new(blocks=[NUM_BLOCKS])]), r"'a': block_ids holds a block id outside"),
    (plan(new_requests=[new(prompt=[5, 9999])]), r"'a': prompt_token_ids holds an id outside"),
    (plan(new_requests=[new(prompt=range(65), blocks=range(5), scheduled=65)]),
     r"'a': prompt_token_ids \+ output_token_ids hold 65 tokens, more than max_model_len 64"),
    (plan(new_requests=[new(rid=f"r{i}") for i in range(5)]), r"max_num_seqs 4"),
    (plan(new_requests=[new(prompt=[])]), r"'a': prompt_token_ids is empty"),
])
def test_invalid_plans_name_request_and_field(small_executor, bad, match):
    with pytest.raises(ValueError, match=match):
        small_executor.execute(bad)
    assert not small_executor.requests, "a rejected plan changes nothing"


def test_continuing_validation_and_forget_first(small_executor):
    ex = small_executor
    assert len(ex.execute(plan(new_requests=[new(scheduled=2)])).outputs) == 0  # a prompt chunk
    with pytest.raises(ValueError, match=r"'a': num_scheduled_tokens 2 after 2 computed"):
        ex.execute(plan(continuing=[cont(scheduled=2)]))
    (out,) = ex.execute(plan(continuing=[cont(scheduled=1)])).outputs  # the prompt's end: samples
    assert out.request_id == "a" and len(out.token_ids) == 1 and len(out.logprobs) == 1
    assert len(out.top_logprobs) == 1 and len(out.top_logprobs[0].token_ids) == TOP
    assert ex.requests["a"].output_token_ids == list(out.token_ids)  # the executor's own copy
    with pytest.raises(ValueError, match=r"'a': request_id is already held"):
        ex.execute(plan(new_requests=[new()]))
    # Forgetting comes first, so the same id may come back whole in the same plan.
    result = ex.execute(plan(forget=["a"], new_requests=[new(blocks=[1])]))
    assert ex.requests["a"].block_ids == [1] and len(result.outputs) == 1
    ex.execute(plan(forget=["a", "never-seen"]))
    assert not ex.requests


def test_bf16_checkpoint_run_in_float32(tiny_llama, tmp_path, panel_gemm_path):
    """A bf16 checkpoint (as most are) run in float32 on a CPU without native bf16: every weight
    is a bf16 value, so panel_gemm keeps its panels in bf16 (exact, half the bytes to read), and
    the outputs still match transformers' float32 run of the same checkpoint."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pagedserve.executor.layers.linear import LinearBase
    from pagedserve.kernels.cpu import panel_gemm

    AutoModelForCausalLM.from_pretrained(tiny_llama).to(torch.bfloat16).save_pretrained(tmp_path)
    for f in tiny_llama.iterdir():
        if f.name.startswith("tokenizer") or f.suffix == ".jinja":
            shutil.copy(f, tmp_path / f.name)
    refs = hf_generate(tmp_path, stdlib_prompts(AutoTokenizer.from_pretrained(tmp_path))[::2])
    executor = make_executor(tmp_path)
    assert panel_gemm.available()  # panel_gemm_path: on an AVX-512 CPU, its AVX2 build
    layers = [m for m in executor.model.modules() if isinstance(m, LinearBase)]
    assert layers and all(m.packed.panels.dtype == torch.bfloat16 for m in layers)
    check_all(run_all(Harness(executor), refs), refs, "bf16 checkpoint in float32")
