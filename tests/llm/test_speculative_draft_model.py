"""Speculative decoding with a draft model (method draft_model) is exact: every request gives the
tokens (and logprobs) it gives without speculation, whatever the draft proposes.

Three drafts over the tiny target's tokenizer: the target itself (every greedy proposal must be
accepted, which holds only if the draft's KV cache stays in step with the target's through
rollback, preemption, chunked prefill and prefix-cache hits), a copy with slightly perturbed
weights (proposals accepted in part), and a smaller random model of other shapes (layers, heads,
head size: its own KV pools over the same blocks; its proposals are nearly always wrong).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pagedserve import LLM, SamplingParams
from pagedserve.protos import executor_pb2
from pagedserve.scheduler.speculative_config import SpeculativeConfig
from tests.conftest import model_dir
from tests.llm.test_speculative import (
    PROMPTS,
    assert_same,
    llm,
    params,
    tokens_across_an_executor_restart,
)

SHARED = "A shared system prompt that fills more than one block of sixteen tokens. "
GREEDY = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, logprobs=2)


def spec(draft: Path, k: int = 4) -> dict:
    return {"method": "draft_model", "model": str(draft), "num_speculative_tokens": k}


@pytest.fixture(scope="module")
def target() -> Path:
    return model_dir("llama")


@pytest.fixture(scope="module")
def noisy_draft(target: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The target with Gaussian noise of 2% of each matrix's spread added: it agrees with the
    target often, not always (about a quarter of its proposals are accepted)."""
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("noisy")
    shutil.copytree(target, out, dirs_exist_ok=True)
    g = torch.Generator().manual_seed(1)
    weights = load_file(target / "model.safetensors")
    save_file({k: v + 0.02 * v.std() * torch.randn(v.shape, generator=g) if v.dim() == 2 else v
               for k, v in weights.items()}, out / "model.safetensors")
    return out


@pytest.fixture(scope="module")
def small_draft(target: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random Llama with the target's tokenizer and other shapes: 2 layers (the target has 4),
    1 KV head of 16 (the target: 2 of 32)."""
    import transformers

    out = tmp_path_factory.mktemp("small")
    shutil.copytree(target, out, dirs_exist_ok=True)
    config = transformers.AutoConfig.from_pretrained(target)
    config.update({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "num_key_value_heads": 1, "intermediate_size": 128, "head_dim": 16})
    torch.manual_seed(1)
    transformers.LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    return out


def test_target_as_its_own_draft_has_every_greedy_proposal_accepted(target: Path) -> None:
    plain = llm().generate(PROMPTS, GREEDY)
    engine = llm(speculative_config=spec(target))
    assert_same(plain, engine.generate(PROMPTS, GREEDY))
    stats = engine.scheduler.stats()
    assert stats.spec_draft_tokens > 0 and stats.spec_verifications > 0
    assert stats.spec_accepted_tokens == stats.spec_draft_tokens


@pytest.mark.parametrize("block_size", [8, 32])
def test_every_proposal_accepted_under_preemption_chunked_prefill_and_prefix_hits(
        target: Path, block_size: int) -> None:
    """The draft's KV follows the target's through all of them: a stale draft row anywhere
    would make some proposal wrong."""
    prompts = [SHARED + p for p in PROMPTS]
    sps = [GREEDY] * len(prompts)
    sps[1] = SamplingParams(n=2, temperature=0, max_tokens=30, ignore_eos=True)
    options = {"num_kv_blocks": 192 // block_size, "max_num_batched_tokens": 24,
               "max_num_seqs": 8, "block_size": block_size}
    plain = llm(**options).generate(prompts, sps)
    engine = llm(speculative_config=spec(target, k=3), **options)
    assert_same(plain, engine.generate(prompts, sps))
    stats = engine.scheduler.stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
    assert 0 < stats.spec_accepted_tokens == stats.spec_draft_tokens


def test_a_draft_that_is_sometimes_wrong_changes_no_token(noisy_draft: Path) -> None:
    """Greedy and seeded sampling with every rule that reads the outputs so far."""
    sps = params()
    plain = llm().generate(PROMPTS, sps)
    engine = llm(speculative_config=spec(noisy_draft))
    assert_same(plain, engine.generate(PROMPTS, sps))
    stats = engine.scheduler.stats()
    assert 0 < stats.spec_accepted_tokens < stats.spec_draft_tokens


def test_a_draft_of_other_shapes_under_preemption_and_n_2(small_draft: Path) -> None:
    prompts = [SHARED + p for p in PROMPTS]
    sps = params()
    sps[1] = SamplingParams(n=2, temperature=1.0, seed=8, max_tokens=30, ignore_eos=True)
    options = {"num_kv_blocks": 12, "max_num_batched_tokens": 24, "max_num_seqs": 8}
    plain = llm(**options).generate(prompts, sps)
    engine = llm(speculative_config=spec(small_draft, k=2), **options)
    assert_same(plain, engine.generate(prompts, sps))
    stats = engine.scheduler.stats()
    assert stats.num_preemptions > 0 and stats.spec_verifications > 0
    # the pool holds both models' KV: fewer blocks in the same bytes than the target's alone
    bytes_budget = {"kv_cache_memory_bytes": 1 << 20}
    assert (llm(**bytes_budget, num_kv_blocks=None, speculative_config=spec(small_draft))
            .executor.num_kv_blocks < llm(**bytes_budget, num_kv_blocks=None)
            .executor.num_kv_blocks)


def test_exact_across_an_executor_restart(noisy_draft: Path) -> None:
    """Requests that lose their executor mid-generation are recomputed by a fresh one, whose
    draft model starts with an empty cache, and end with the tokens of a run without either."""
    sps = params()[:3]
    plain = llm().generate(PROMPTS[:3], sps)
    engine = llm(speculative_config=spec(noisy_draft))
    assert tokens_across_an_executor_restart(engine, plain, sps, "spec_verifications") == [
        o.outputs[0].token_ids for o in plain]


def test_bad_draft_model_is_a_value_error_naming_the_field(target: Path, tmp_path: Path) -> None:
    for value in ({"method": "draft_model"}, {"method": "draft_model", "model": ""},
                  {"method": "ngram", "model": str(target)}):
        with pytest.raises(ValueError, match=r"speculative_config\.model"):
            SpeculativeConfig.parse(value)
    swapped = tmp_path / "swapped"  # the same vocab_size, two tokens' ids exchanged
    shutil.copytree(target, swapped)
    data = json.loads((target / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (swapped / "tokenizer.json").write_text(json.dumps(data))
    for draft, needle in [(tmp_path / "missing", "cannot load"),
                          (model_dir("llama", "micro"), "vocab_size"),
                          (swapped, "tokenizer differs")]:
        with pytest.raises(ValueError, match=rf"speculative_config\.model: .*{needle}"):
            LLM(target, dtype="float32", num_kv_blocks=64, speculative_config=spec(draft))


def test_an_executor_without_a_draft_model_refuses_to_propose(target: Path) -> None:
    engine = llm()
    engine.scheduler.add_request("r", [1, 2, 3], executor_pb2.SamplingParams(), max_tokens=8)
    engine.driver.step()  # the prompt: one token held, not computed
    plan = executor_pb2.StepPlan(step_id=99, continuing_requests=[executor_pb2.ContinuingRequest(
        request_id="r", num_scheduled_tokens=3, num_speculative_tokens=2)])
    with pytest.raises(ValueError, match="has no draft model"):
        engine.executor.execute(plan)


def test_serve_hands_the_draft_model_to_its_executor_and_scheduler(tmp_path: Path) -> None:
    from pagedserve.cli import build_parser
    from pagedserve.serve import build_specs

    value = json.dumps(spec(Path("d"), k=3))
    specs = {s.name: s for s in build_specs(
        build_parser().parse_args(["serve", "m", "--speculative-config", value]), "m",
        str(tmp_path))}
    for name in ("executor", "scheduler"):
        argv = specs[name].argv
        parsed = SpeculativeConfig.parse(argv[argv.index("--speculative-config") + 1])
        assert (parsed.method, parsed.model, parsed.num_speculative_tokens) == ("draft_model",
                                                                                "d", 3)
    args = build_parser().parse_args(["executor", "m", "--speculative-config", value])
    assert args.speculative_config.draft_model == "d"


@pytest.mark.timeout(300)
def test_served_draft_model_is_exact_and_counted(target: Path, tmp_path: Path) -> None:
    """Over gRPC (serve's executor and scheduler processes): the plan's num_speculative_tokens
    reach the executor, and the target as its own draft has every proposal accepted."""
    import re
    import urllib.request

    import openai

    from pagedserve.router.metrics import PREFIX
    from tests.e2e.conftest import running_serve

    prompts = PROMPTS[:3]
    plain = llm().generate(prompts, GREEDY)
    args = [str(target), "--grpc-port", "-1", "--num-kv-blocks", "64", "--dtype", "float32",
            "--drain-timeout", "5", "--speculative-config", json.dumps(spec(target))]
    with running_serve(args, tmp_path / "serve.log", target) as server:
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0,
                               timeout=120)
        texts = [client.completions.create(model="", prompt=p, temperature=0, max_tokens=30,
                                           extra_body={"ignore_eos": True}).choices[0].text
                 for p in prompts]
        metrics = urllib.request.urlopen(f"{server.base_url}/metrics", timeout=30).read().decode()
    counts = {name: float(re.search(rf"^{PREFIX}_spec_decode_num_{name}_tokens_total (\S+)$",
                                    metrics, re.M).group(1)) for name in ("draft", "accepted")}
    assert 0 < counts["accepted"] == counts["draft"], metrics
    assert texts == [o.outputs[0].text for o in plain]


def test_a_draft_model_scheduler_refuses_an_executor_without_one(target: Path) -> None:
    from pagedserve.scheduler.config import SchedulerConfig
    from pagedserve.scheduler.driver import StepDriver
    from pagedserve.scheduler.scheduler import Scheduler

    engine = llm()
    desc = engine.executor.describe()
    assert desc.draft_model == ""
    config = SchedulerConfig.from_describe(desc, speculative=SpeculativeConfig.parse(spec(target)))
    with pytest.raises(ValueError, match="no draft model"):
        StepDriver(Scheduler(config), engine.executor)


@pytest.mark.parametrize("value", ["", 3])
def test_executor_config_rejects_a_bad_draft_model(value: object) -> None:
    from pagedserve.executor.config import ExecutorConfig

    with pytest.raises(ValueError, match="draft_model"):
        ExecutorConfig(model="m", draft_model=value)  # type: ignore[arg-type]
