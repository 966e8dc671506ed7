"""The C layer loop (kernels/cpu/layer_loop.c, chosen by executor/models/layer_loop.py) against
the module path it replaces: the same tokens and the same logprobs, bit for bit, on quantized
models (what it takes) through chunked prompts mixed with decode rows, greedy and seeded; and the
models and settings it must leave to the modules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pagedserve import LLM, SamplingParams
from pagedserve.cli import main
from pagedserve.executor.models.layer_loop import ENV_DISABLE
from pagedserve.kernels.cpu.layer_loop import unavailable
from tests.conftest import model_dir

# lengths past mistral tiny's 64-token window, chunked at 32 tokens a step beside decode rows
PROMPT_LENGTHS = (3, 17, 40, 70)
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, min_tokens=12, logprobs=3)
SEEDED = SamplingParams(temperature=0.9, top_p=0.9, max_tokens=12, min_tokens=12, seed=7,
                        logprobs=3)
MODELS = [("llama", "int4-awq-format"), ("qwen2", "int8"), ("qwen3", "int8"),
          ("mistral", "int4-awq-format")]


@pytest.fixture(scope="module")
def quantized(tmp_path_factory) -> dict[tuple[str, str], Path]:
    """make-model's tiny llama (int4, AWQ layout), qwen2 (q/k/v biases; int8), qwen3 (per-head
    q/k norms; int8) and mistral (sliding window; int4), quantized by `pagedserve quantize`."""
    root = tmp_path_factory.mktemp("quantized")
    out = {}
    for arch, method in MODELS:
        out[arch, method] = root / f"{arch}-{method}"
        assert main(["quantize", str(model_dir(arch)), str(out[arch, method]),
                     "--method", method]) == 0
    return out


def _prompts(vocab: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"prompt_token_ids": torch.randint(3, vocab, (n,), generator=g).tolist()}
            for n in PROMPT_LENGTHS]


def _run(model: Path, dtype: str, params: SamplingParams) -> tuple[list, str]:
    """(per prompt: tokens and logprobs; why the loop was not used, "" when it was)."""
    with LLM(model, dtype=dtype, num_kv_blocks=64, max_num_batched_tokens=32) as llm:
        vocab = llm.executor.model_config.vocab_size
        outs = llm.generate(_prompts(vocab), params, use_tqdm=False)
        reason = llm.executor.model.layer_loop.reason
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs], reason


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch,method", MODELS)
def test_loop_equals_the_modules_bit_for_bit(quantized, arch, method, dtype, monkeypatch) -> None:
    if unavailable(getattr(torch, dtype)):
        pytest.skip(f"the loop does not run here: {unavailable(getattr(torch, dtype))}")
    model = quantized[arch, method]
    for params in (GREEDY, SEEDED):
        looped, reason = _run(model, dtype, params)
        assert reason == ""  # the loop ran
        with monkeypatch.context() as m:
            m.setenv(ENV_DISABLE, "1")
            modules, reason = _run(model, dtype, params)
        assert ENV_DISABLE in reason
        assert looped == modules


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_dense_float32_through_panels_equals_the_modules(arch, panel_gemm_path,
                                                         monkeypatch) -> None:
    """A dense float32 model on panel_gemm's AVX2 path (the default float32 GEMM of CPUs with AVX2
    and no AVX-512; here the AVX2 build): the loop multiplies through the same panels."""
    looped, reason = _run(model_dir(arch), "float32", SEEDED)
    assert reason == ""
    monkeypatch.setenv(ENV_DISABLE, "1")
    modules, _ = _run(model_dir(arch), "float32", SEEDED)
    assert looped == modules


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_dense_bf16_through_pairs_equals_the_modules(arch, paired_bf16_path, monkeypatch) -> None:
    """A dense bf16 model in panel_gemm512's paired panels (the default bf16 GEMM of an Intel Xeon
    without AMX; forced here on any AVX-512 CPU): the loop multiplies through the same pairs."""
    if unavailable(torch.bfloat16):
        pytest.skip(f"the loop does not run here: {unavailable(torch.bfloat16)}")
    looped, reason = _run(model_dir(arch), "bfloat16", SEEDED)
    assert reason == ""
    monkeypatch.setenv(ENV_DISABLE, "1")
    modules, _ = _run(model_dir(arch), "bfloat16", SEEDED)
    assert looped == modules


def test_dense_and_batch_invariant_models_keep_the_modules(quantized, onednn_bf16_path) -> None:
    from pagedserve.kernels.cpu import panel_gemm

    for dtype in ("float32", "bfloat16"):
        with LLM(model_dir("llama"), dtype=dtype, num_kv_blocks=16) as llm:
            llm.generate(["hello"], SamplingParams(max_tokens=2), use_tqdm=False)
            if dtype == "bfloat16" or not panel_gemm.available():  # oneDNN's dense GEMMs
                assert "neither a packed quantized weight nor in panels" in \
                    llm.executor.model.layer_loop.reason
    with LLM(quantized["llama", "int4-awq-format"], dtype="float32", num_kv_blocks=16) as llm:
        model = llm.executor.model
        model.model.layers[3].mlp.down_proj.min_rows = 2  # as batch_invariance pads a GEMM
        llm.generate(["hello"], SamplingParams(max_tokens=2), use_tqdm=False)
        assert "batch-invariant" in model.layer_loop.reason


def test_a_slot_outside_the_cache_is_an_index_error(quantized) -> None:
    from pagedserve.executor.attention_metadata import AttentionMetadata
    from pagedserve.executor.models.layer_loop import build_layer_loop

    with LLM(quantized["llama", "int4-awq-format"], dtype="float32", num_kv_blocks=4) as llm:
        model, cache = llm.executor.model, llm.executor.kv_cache
        loop, why = build_layer_loop(model, cache)
        assert loop is not None, why
        slots = cache.num_blocks * cache.block_size
        attn = AttentionMetadata(torch.tensor([0, slots], dtype=torch.int64),
                                 torch.tensor([0, 2], dtype=torch.int32),
                                 torch.tensor([2], dtype=torch.int32),
                                 torch.zeros(1, 4, dtype=torch.int32), 2, 2)
        hidden = model.model.embed_tokens(torch.tensor([5, 6]))
        with pytest.raises(IndexError, match=rf"slot_mapping\[1\] = {slots} is outside"):
            loop.run(hidden, torch.tensor([0, 1]), attn.slot_mapping, attn.cu_seqlens_q,
                     attn.seq_lens, attn.block_tables)
