"""--kv-cache-dtype through the whole engine (LLM: scheduler + executor, CPU backend) on the tiny
float32 llama.

The tiny random model attends sharply (scores up to ~20), so its greedy tokens are sensitive to
any change in K/V: fp8's 2^-4 relative rounding moves them after a token or two, bf16's 2^-9
after five or more (measured against transformers over 16 tokens: bf16 first differed at tokens
5-16, fp8 at 0-5, never at a near-tie). So the exact check is against a twin engine: a float32
cache fed K/V that torch itself rounded (`.to(torch.bfloat16)`, or `/ s`, saturate,
`.to(torch.float8_e4m3fn)`, `* s`) must give the same tokens and logprobs, through chunked
prefill, decode and prefix-cache hits. The real model's fp8 answers against
transformers are in tests/gguf/test_kv_cache_fp8_real.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pagedserve import LLM, SamplingParams
from pagedserve.executor.config import ExecutorConfig
from pagedserve.executor.layers.attention import PagedAttention
from tests.conftest import model_dir
from tests.hf_reference import stdlib_prompts

FP8 = torch.float8_e4m3fn
N = 8


def _prompts() -> list[dict]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir("llama"))
    shared = stdlib_prompts(tok, [40])[0]  # a prefix of more than two blocks, shared below
    plain = stdlib_prompts(tok, [3, 16, 17, 64, 129])
    return [{"prompt_token_ids": p} for p in [*plain, [*shared, 5, 6], [*shared, 7]]]


def _generate(monkeypatch, kv_cache_dtype: str, round_kv=None, **options) -> list:
    """Greedy outputs (token ids, top-3 logprobs); round_kv rounds K/V before the attention
    layer stores them (the twin)."""
    if round_kv is not None:
        forward = PagedAttention.forward
        monkeypatch.setattr(PagedAttention, "forward", lambda self, q, k, v, *rest: forward(
            self, q, round_kv(self, k, "k"), round_kv(self, v, "v"), *rest))
    llm = LLM(model_dir("llama"), dtype="float32", kv_cache_dtype=kv_cache_dtype,
              max_num_batched_tokens=48, **{"num_kv_blocks": 64, **options})
    outs = llm.generate(_prompts(), SamplingParams(temperature=0, max_tokens=N, ignore_eos=True,
                                                   logprobs=3), use_tqdm=False)
    monkeypatch.undo()
    return [o.outputs[0] for o in outs], llm


def _torch_bf16(layer, x, which):
    return x.to(torch.bfloat16).float()


def _torch_fp8(layer, x, which):
    s = layer.k_scale if which == "k" else layer.v_scale
    return (x / s).clamp(-448.0, 448.0).to(FP8).float() * s


@pytest.mark.parametrize(("kv_cache_dtype", "twin"), [("bfloat16", _torch_bf16), ("fp8", _torch_fp8)])
def test_narrow_cache_equals_float32_cache_on_torch_rounded_kv(monkeypatch, kv_cache_dtype,
                                                               twin) -> None:
    narrow, llm = _generate(monkeypatch, kv_cache_dtype)
    wide, _ = _generate(monkeypatch, "auto", twin)
    assert llm.scheduler.stats().prefix_cache_hits > 0
    for a, b in zip(narrow, wide, strict=True):
        assert a.token_ids == b.token_ids
        for la, lb in zip(a.logprobs, b.logprobs, strict=True):
            assert la.keys() == lb.keys() and all(abs(la[t] - lb[t]) < 1e-5 for t in la)


def test_bf16_cache_keeps_the_float32_greedy_tokens(monkeypatch) -> None:
    """The first four tokens of every prompt (bf16 first moved a token at the fifth, at worst)."""
    narrow, _ = _generate(monkeypatch, "bfloat16")
    wide, _ = _generate(monkeypatch, "auto")
    assert [o.token_ids[:4] for o in narrow] == [o.token_ids[:4] for o in wide]
    assert any(a.token_ids != b.token_ids or a.logprobs != b.logprobs
               for a, b in zip(narrow, wide))  # the cache really was narrower


def test_the_pool_holds_more_tokens_when_narrower() -> None:
    """Same byte budget: bf16 blocks 2x float32's, fp8 2x bf16's (4x float32's); the scheduler
    learns the count from the executor's Describe."""
    blocks = {}
    for dtype in ("auto", "bfloat16", "fp8"):
        llm = LLM(model_dir("llama"), dtype="float32", kv_cache_dtype=dtype,
                  kv_cache_memory_bytes=3 << 20)
        desc = llm.executor.describe()
        assert llm.scheduler.config.num_kv_blocks == desc.num_kv_blocks
        assert llm.executor.kv_cache.k[0].shape[0] == desc.num_kv_blocks
        blocks[dtype] = desc.num_kv_blocks
    assert blocks["bfloat16"] == 2 * blocks["auto"]
    assert blocks["fp8"] >= 1.9 * blocks["bfloat16"] and blocks["fp8"] == 4 * blocks["auto"]


@pytest.mark.parametrize("value", ["int8", "fp16", "", None, 8])
def test_a_bad_kv_cache_dtype_is_a_value_error_naming_the_field(value) -> None:
    with pytest.raises(ValueError, match=r"^kv_cache_dtype: "):
        ExecutorConfig(model="m", kv_cache_dtype=value)
    with pytest.raises(ValueError, match=r"^kv_cache_dtype: "):
        LLM(model_dir("llama"), kv_cache_dtype=value)


def test_aliases() -> None:
    assert ExecutorConfig(model="m", kv_cache_dtype="bf16").kv_cache_dtype == "bfloat16"
    assert ExecutorConfig(model="m", kv_cache_dtype="fp8_e4m3").kv_cache_dtype == "fp8"


def _with_scales(tmp_path: Path, scales: dict[str, torch.Tensor]) -> Path:
    """The tiny llama with extra KV-scale tensors in its safetensors file."""
    out = tmp_path / "model"
    shutil.copytree(model_dir("llama"), out)
    weights = load_file(out / "model.safetensors")
    save_file({**weights, **scales}, out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_checkpoint_scales_reach_the_attention_layers(tmp_path, monkeypatch) -> None:
    scales = {"model.layers.0.self_attn.k_scale": torch.tensor(0.5),
              "model.layers.0.self_attn.v_scale": torch.tensor([0.25]),
              "model.layers.2.self_attn.kv_scale": torch.tensor(2.0)}
    path = _with_scales(tmp_path, scales)
    llm = LLM(path, dtype="float32", kv_cache_dtype="fp8", num_kv_blocks=32)
    layers = [m for m in llm.executor.model.modules() if isinstance(m, PagedAttention)]
    assert [(m.k_scale, m.v_scale) for m in layers] == [(0.5, 0.25), (1.0, 1.0), (2.0, 2.0),
                                                        (1.0, 1.0)]
    out = llm.generate({"prompt_token_ids": [0, 5, 6, 7, 8]},
                       SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=1))
    twin = LLM(path, dtype="float32", num_kv_blocks=32)  # the scales are ignored without fp8
    forward = PagedAttention.forward
    twin_layers = [m for m in twin.executor.model.modules() if isinstance(m, PagedAttention)]
    for m, ours in zip(twin_layers, layers):
        m.twin_scales = (ours.k_scale, ours.v_scale)
    monkeypatch.setattr(PagedAttention, "forward", lambda self, q, k, v, *rest: forward(
        self, q, *(((x / s).clamp(-448, 448).to(FP8).float() * s)
                   for x, s in zip((k, v), self.twin_scales)), *rest))
    want = twin.generate({"prompt_token_ids": [0, 5, 6, 7, 8]},
                         SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=1))
    assert out[0].outputs[0].token_ids == want[0].outputs[0].token_ids


def test_a_bad_checkpoint_scale_names_the_tensor(tmp_path) -> None:
    path = _with_scales(tmp_path, {"model.layers.1.self_attn.k_scale": torch.tensor(-1.0)})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_scale"):
        LLM(path, dtype="float32", kv_cache_dtype="fp8", num_kv_blocks=32)


def test_the_transformers_fallback_reads_an_fp8_cache_as_the_native_model(monkeypatch) -> None:
    native, _ = _generate(monkeypatch, "fp8", num_kv_blocks=64)
    fallback, _ = _generate(monkeypatch, "fp8", num_kv_blocks=64, model_impl="transformers")
    assert [o.token_ids for o in native] == [o.token_ids for o in fallback]


def test_the_cli_carries_the_option_to_the_executor_config(monkeypatch, tmp_path) -> None:
    from pagedserve.cli import _run_executor, build_parser
    from pagedserve.executor import server
    from pagedserve.serve import build_specs

    seen = []
    monkeypatch.setattr(server, "run_executor", lambda config, *a, **k: seen.append(config) or 0)
    _run_executor(build_parser().parse_args(["executor", "m", "--kv-cache-dtype", "fp8"]))
    _run_executor(build_parser().parse_args(["executor", "m"]))
    assert [c.kv_cache_dtype for c in seen] == ["fp8", "auto"]
    args = build_parser().parse_args(["serve", "m", "--kv-cache-dtype", "bfloat16"])
    executor = next(s for s in build_specs(args, "m", str(tmp_path)) if s.name == "executor")
    assert "--kv-cache-dtype bfloat16" in " ".join(executor.argv)
    plain = build_parser().parse_args(["serve", "m"])
    executor = next(s for s in build_specs(plain, "m", str(tmp_path)) if s.name == "executor")
    assert "--kv-cache-dtype" not in executor.argv


def test_speculative_rollback_over_an_fp8_cache() -> None:
    """Rejected drafts leave their K/V in slots the next tokens overwrite: with an fp8 cache,
    verified speculation (tests/llm/test_speculative.py's oracle, which proposes the plain run's
    tokens with some wrong) gives the tokens of plain decoding."""
    from tests.llm.test_speculative import Oracle

    prompts = ["The quick brown fox", "def main():\n    return 1", "Hello"]
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    options = {"dtype": "float32", "kv_cache_dtype": "fp8", "num_kv_blocks": 64}
    plain = LLM(model_dir("llama"), **options).generate(prompts, sp, use_tqdm=False)
    spec = LLM(model_dir("llama"), speculative_config={"method": "ngram",
                                                       "num_speculative_tokens": 3}, **options)
    spec.scheduler.speculator.propose = Oracle(
        [o.prompt_token_ids + o.outputs[0].token_ids for o in plain],
        spec.executor.model_config.vocab_size)
    outs = spec.generate(prompts, sp, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in plain]
    stats = spec.scheduler.stats()
    assert 0 < stats.spec_accepted_tokens < stats.spec_draft_tokens
