"""The native mixture-of-experts models (models/moe.py: Mixtral, Qwen3-MoE) against transformers.

Whole engine, `LLM(model_impl="native")`, float32, on make-model's micro and tiny models: one
prompt that shares a prefix with a later one runs alone and leaves its blocks in the prefix cache;
then five prompts run as one batch under a 16-token budget, so the longer ones are cut into chunks
and the last starts on the cached prefix. Every greedy token must be transformers' (near-ties
excepted, tests/hf_reference.py). Also: the routers against transformers' own router modules,
the layer's packed CPU path against the reference kernel, dense layers among sparse ones
(Qwen3-MoE's mlp_only_layers), and the config checks.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from structlog.testing import capture_logs

from pagedserve import LLM, SamplingParams
from pagedserve.executor.layers.fused_moe import FusedMoE, route
from pagedserve.executor.loader import load_model
from pagedserve.executor.model_config import ModelConfig
from pagedserve.executor.models.moe import MoEForCausalLM, SparseMoeBlock
from pagedserve.kernels import reference
from tests.conftest import model_dir
from tests.hf_reference import TOP, assert_greedy_matches, hf_greedy, stdlib_prompts

N = 8  # generated tokens per prompt
BLOCK, BUDGET = 8, 16  # KV block size and tokens per step: prompts of 19 and 45 tokens chunk
GREEDY = SamplingParams(temperature=0.0, max_tokens=N, min_tokens=N, logprobs=TOP)
ARCHS = ("mixtral", "qwen3_moe")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small models make many tiny GEMMs: a second thread mostly waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _check_engine(path: Path) -> LLM:
    """The batched, chunked, prefix-cached comparison of the module docstring."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    prefix = tok(" ".join(["the shared system prompt"] * 5), add_special_tokens=False).input_ids
    prompts = stdlib_prompts(tok, [1, 6, 19, 45]) + stdlib_prompts(tok, [4, 25], prefix=prefix)
    refs = hf_greedy(path, prompts, N)
    llm = LLM(path, dtype="float32", model_impl="native", num_kv_blocks=64, block_size=BLOCK,
              max_num_batched_tokens=BUDGET)
    assert isinstance(llm.executor.model, MoEForCausalLM)
    for batch in (refs[4:5], refs[:4] + refs[5:]):  # alone first: its prefix blocks stay cached
        outs = llm.generate([{"prompt_token_ids": r.prompt} for r in batch], GREEDY,
                            use_tqdm=False)
        for out, ref in zip(outs, batch):
            assert_greedy_matches(out.outputs[0].token_ids, out.outputs[0].logprobs, ref)
    cached = (len(prefix) + 1) // BLOCK * BLOCK  # BOS + prefix, in whole blocks
    assert llm.scheduler.stats().prefix_cache_hits >= cached >= 2 * BLOCK
    return llm


@pytest.mark.parametrize("preset", ["micro", "tiny"])
@pytest.mark.parametrize("arch", ARCHS)
def test_native_moe_gives_transformers_greedy_tokens(arch: str, preset: str) -> None:
    _check_engine(model_dir(arch, preset))


def test_dense_layers_among_sparse_ones(tmp_path: Path) -> None:
    """Qwen3-MoE with mlp_only_layers: layer 1 of 3 has the dense MLP, the others experts."""
    from transformers import AutoConfig, Qwen3MoeForCausalLM

    from pagedserve.make_model import sharpen_logits

    micro = model_dir("qwen3_moe", "micro")
    config = AutoConfig.from_pretrained(micro)
    config.num_hidden_layers, config.mlp_only_layers = 3, [1]
    torch.manual_seed(1)
    model = Qwen3MoeForCausalLM(config)
    sharpen_logits(model, config.hidden_size)
    model.save_pretrained(tmp_path)
    for f in micro.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "generation")):
            shutil.copy(f, tmp_path / f.name)
    llm = _check_engine(tmp_path)
    layers = llm.executor.model.model.layers
    assert [isinstance(layer.mlp, SparseMoeBlock) for layer in layers] == [True, False, True]


@pytest.mark.parametrize("arch", ARCHS)
def test_auto_picks_the_native_class_and_says_so(arch: str) -> None:
    with capture_logs() as logs:
        model, config = load_model(model_dir(arch, "micro"), dtype="float32")
    assert isinstance(model, MoEForCausalLM)
    events = [e for e in logs if e["event"].startswith("model implementation")]
    assert [(e["event"], e["model_class"]) for e in events] == [
        ("model implementation: native", "MoEForCausalLM")]
    assert (config.num_experts, config.num_experts_per_tok) == (4, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ARCHS)
def test_router_matches_transformers(arch: str, dtype: torch.dtype) -> None:
    from transformers import AutoConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    hf_config = AutoConfig.from_pretrained(model_dir(arch, "micro"))
    hf_config.num_experts_per_tok, experts = 3, hf_config.num_local_experts
    for norm in (True, False) if arch == "qwen3_moe" else (True,):
        hf_config.norm_topk_prob = norm
        hf = (MixtralTopKRouter if arch == "mixtral" else Qwen3MoeTopKRouter)(hf_config)
        torch.nn.init.normal_(hf.weight)
        hf = hf.to(dtype)
        x = torch.randn(50, hf_config.hidden_size).to(dtype)
        _, want_weights, want_ids = hf(x)
        weights, ids = route(torch.nn.functional.linear(x, hf.weight), 3, norm,
                             dtype if arch == "qwen3_moe" else torch.float32)
        assert ids.shape == (50, 3) and int(ids.max()) < experts
        assert torch.equal(ids, want_ids) and weights.dtype == want_weights.dtype
        torch.testing.assert_close(weights, want_weights, rtol=0, atol=0)


def test_packed_cpu_experts_match_the_reference() -> None:
    """The layer's CPU path (each expert packed for the CPU GEMM, then the grouped path)."""
    from pagedserve.kernels import cpu

    layer = FusedMoE(4, 64, 48, cpu)
    for param in (layer.w13_weight, layer.w2_weight):
        param.data.normal_(0.0, 0.1)
    w13, w2 = layer.w13_weight.detach().clone(), layer.w2_weight.detach().clone()
    if not layer.pack_for_cpu():
        pytest.skip("no packed CPU GEMM on this machine")
    assert layer.w13_weight.is_meta and layer.packed is not None
    for tokens in (1, 3, 70):
        x = torch.randn(tokens, 64)
        ids = torch.stack([torch.randperm(3)[:2] for _ in range(tokens)])  # expert 3 idle
        weights = torch.rand(tokens, 2)
        want = reference.fused_experts(x, w13, w2, weights, ids)
        torch.testing.assert_close(layer(x, weights, ids), want, rtol=1e-5, atol=1e-5)


def _qwen3_moe_raw(**changes) -> dict:
    raw = json.loads((model_dir("qwen3_moe", "micro") / "config.json").read_text())
    return {**raw, **changes}


def test_config_parses_the_experts_of_each_model() -> None:
    mixtral = ModelConfig.from_dir(model_dir("mixtral", "micro"))
    assert (mixtral.num_experts, mixtral.moe_intermediate_size, mixtral.norm_topk_prob,
            mixtral.round_router_weights, mixtral.moe_layers) == (4, 128, True, False,
                                                                  (True, True))
    qwen = ModelConfig.from_dict(_qwen3_moe_raw(num_hidden_layers=4, decoder_sparse_step=2))
    assert qwen.moe_layers == (False, True, False, True) and qwen.qk_norm
    assert (qwen.moe_intermediate_size, qwen.round_router_weights) == (64, True)
    qwen = ModelConfig.from_dict(_qwen3_moe_raw(use_sliding_window=True, sliding_window=32))
    assert qwen.sliding_window == 32 and qwen.layer_sliding_window(1) == 32


@pytest.mark.parametrize(("changes", "why"), [
    ({"decoder_sparse_step": 0}, "decoder_sparse_step must be an integer >= 1"),
    ({"mlp_only_layers": [5]}, "mlp_only_layers must list layer indices below 2"),
])
def test_config_refuses_unsupported_layouts_naming_the_field(changes: dict, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        ModelConfig.from_dict(_qwen3_moe_raw(**changes))


@pytest.mark.parametrize("arch", ARCHS)
def test_missing_expert_weight_is_named_as_the_checkpoint_names_it(arch: str) -> None:
    from safetensors.torch import load_file

    path = model_dir(arch, "micro")
    config = ModelConfig.from_dir(path)
    weights = load_file(path / "model.safetensors")
    gone = ("model.layers.1.block_sparse_moe.experts.2.w3.weight" if arch == "mixtral"
            else "model.layers.1.mlp.experts.2.up_proj.weight")
    del weights[gone]
    with torch.device("cpu"):
        model = MoEForCausalLM(config, reference)
    with pytest.raises(ValueError, match=rf"missing weights \(1\): {gone}"):
        model.load_weights(weights.items())
