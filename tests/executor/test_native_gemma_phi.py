"""Native Gemma 2, Gemma 3 text and Phi-3 (models/gemma2.py, gemma3.py, phi3.py) against
transformers' greedy generate on the same weights, through the whole engine
(`LLM(model_impl="native")`), plus their config parsing and LongRoPE's tables.

Per model (make-model, float32): one prompt that shares a prefix with a later one runs alone and
leaves its full blocks in the prefix cache; then the others run as one batch under a 16-token
budget, so the longer ones are cut into chunks and the last one starts on the cached prefix. Every
token must be transformers' (near-ties excepted, tests/hf_reference.py). Variants edit config.json
beside the same weights (tied embeddings, rope scaling, LongRoPE, partial rotary, a window on every
layer): transformers and pagedserve then read the same changed model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pagedserve import LLM, SamplingParams
from pagedserve.executor.layers.rotary import LongRopeEmbedding, longrope_parameters
from pagedserve.executor.model_config import ModelConfig
from pagedserve.executor.models import MODEL_REGISTRY
from pagedserve.executor.models.impl import choose_model_impl, read_config
from pagedserve.kernels import reference
from tests.conftest import model_dir
from tests.hf_reference import TOP, assert_greedy_matches, hf_greedy, stdlib_prompts

N = 8  # generated tokens per prompt
BLOCK, BUDGET = 8, 16  # KV block size and tokens per step: prompts of 19 and 45 tokens chunk
GREEDY = SamplingParams(temperature=0.0, max_tokens=N, min_tokens=N, logprobs=TOP)
ARCHS = ("gemma2", "gemma3_text", "phi3")
NATIVE = {"gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
          "phi3": "Phi3ForCausalLM"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny GEMMs: a second thread mostly waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _check(llm: LLM, refs) -> None:
    outs = llm.generate([{"prompt_token_ids": r.prompt} for r in refs], GREEDY, use_tqdm=False)
    for out, ref in zip(outs, refs):
        assert_greedy_matches(out.outputs[0].token_ids, out.outputs[0].logprobs, ref)


def _native_llm(path: Path, budget: int = BUDGET) -> LLM:
    llm = LLM(path, dtype="float32", model_impl="native", num_kv_blocks=64, block_size=BLOCK,
              max_num_batched_tokens=budget)
    assert type(llm.executor.model) is MODEL_REGISTRY[read_config(path)["architectures"][0]]
    return llm


@pytest.mark.parametrize("preset", ["micro", "tiny"])
@pytest.mark.parametrize("arch", ARCHS)
def test_native_gives_transformers_greedy_tokens(arch: str, preset: str) -> None:
    """Batched, chunked, with a prefix-cache hit (micro: window 16 on alternate layers of
    Gemma, so the 45-token prompt and the cached one slide past it; tiny: 4 layers, window 64)."""
    from transformers import AutoTokenizer

    path = model_dir(arch, preset)
    tok = AutoTokenizer.from_pretrained(path)
    prefix = tok(" ".join(["the shared system prompt"] * 5), add_special_tokens=False).input_ids
    prompts = stdlib_prompts(tok, [1, 6, 19, 45]) + stdlib_prompts(tok, [4, 25], prefix=prefix)
    refs = hf_greedy(path, prompts, N)
    llm = _native_llm(path)
    _check(llm, refs[4:5])  # alone: its full prefix blocks stay cached
    _check(llm, refs[:4] + refs[5:])  # a batch, chunked, the last prompt on the cached prefix
    cached = (len(prefix) + 1) // BLOCK * BLOCK  # BOS + prefix, in whole blocks
    assert llm.scheduler.stats().prefix_cache_hits >= cached >= 2 * BLOCK


def _variant(tmp_path: Path, arch: str, **changes) -> Path:
    """The micro model's weights under a config.json with `changes` (dicts merged one deep)."""
    src = model_dir(arch, "micro")
    out = tmp_path / arch
    shutil.copytree(src, out)
    raw = json.loads((out / "config.json").read_text())
    for key, value in changes.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) and key in raw else value
    (out / "config.json").write_text(json.dumps(raw))
    if raw.get("tie_word_embeddings"):  # the LM head is the embedding: a checkpoint without it
        from safetensors.torch import load_file, save_file

        tensors = load_file(out / "model.safetensors")
        del tensors["lm_head.weight"]
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def _longrope(factors: int, original: int) -> dict:
    """Distinct short and long factors, so a token rotated with the wrong table shows."""
    return {"rope_type": "longrope", "original_max_position_embeddings": original,
            "short_factor": [1.0 + 0.25 * i for i in range(factors)],
            "long_factor": [2.0 + 1.5 * i for i in range(factors)]}


VARIANTS = {
    # tied embeddings
    "gemma2-tied": ("gemma2", dict(tie_word_embeddings=True)),
    # linear scaling on the global layers only; the sliding ones keep their own base
    "gemma3-scaled-global": ("gemma3_text", dict(
        tie_word_embeddings=True, attn_logit_softcapping=10.0, final_logit_softcapping=20.0,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0,
                                            "rope_theta": 1_000_000.0}})),
    # LongRoPE over half of each head (original length 24: the 28-token prompt turns long in
    # decode, the 45-token one is long throughout), and a 16-token window on every layer
    "phi3-longrope": ("phi3", dict(
        rope_parameters={**_longrope(4, 24), "partial_rotary_factor": 0.5, "rope_theta": 1e4},
        original_max_position_embeddings=24, sliding_window=16)),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_native_variants_give_transformers_greedy_tokens(tmp_path: Path, variant: str) -> None:
    """Prompts go in whole (a 128-token budget): LongRoPE picks its table per forward in
    transformers, which a prompt cut across the original length would not reproduce."""
    from transformers import AutoTokenizer

    arch, changes = VARIANTS[variant]
    path = _variant(tmp_path, arch, **changes)
    tok = AutoTokenizer.from_pretrained(path)
    refs = hf_greedy(path, stdlib_prompts(tok, [3, 17, 28, 45]), N)
    _check(_native_llm(path, budget=128), refs)


@pytest.mark.parametrize("arch", ARCHS)
def test_auto_picks_native(arch: str) -> None:
    assert choose_model_impl(read_config(model_dir(arch, "micro"))) == "native"
    assert NATIVE[arch] in MODEL_REGISTRY


def test_longrope_tables_are_transformers() -> None:
    """Both inverse-frequency sets and the attention factor bitwise equal to transformers' own
    longrope init; the table holds the short set first, the long one after, scaled."""
    from transformers import Phi3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = _longrope(16, 4096)
    cfg = Phi3Config(hidden_size=256, num_attention_heads=8, max_position_embeddings=131072,
                     original_max_position_embeddings=4096, rope_scaling=scaling)
    init = ROPE_INIT_FUNCTIONS["longrope"]
    short_ref, attention_ref = init(cfg)
    long_ref, _ = init(cfg, seq_len=4097)
    config = ModelConfig.from_dict({**cfg.to_dict(), "architectures": ["Phi3ForCausalLM"]})
    short, long, attention = longrope_parameters(32, config.rope_theta, config.rope_scaling,
                                                 config.max_position_embeddings)
    assert torch.equal(short, short_ref) and torch.equal(long, long_ref)
    assert attention == attention_ref and attention > 1.0
    rotary = LongRopeEmbedding(32, 131072, config.rope_theta, config.rope_scaling, reference)
    freqs = 5.0 * long_ref
    expected = torch.cat((freqs.cos(), freqs.sin())) * attention_ref
    assert torch.equal(rotary.cos_sin_cache[131072 + 5], expected)


def test_longrope_table_per_sequence() -> None:
    """A token reads the long table when its sequence's context is past the original length,
    whatever the other sequences of the step."""
    from pagedserve.executor.attention_metadata import AttentionMetadata

    rotary = LongRopeEmbedding(4, 100, 1e4, _longrope(2, 10), reference)
    # sequence 0: decode at position 10 (context 11 > 10: long); 1: prompt chunk 3..6 (short)
    attn = AttentionMetadata(
        slot_mapping=torch.zeros(5, dtype=torch.int64),
        cu_seqlens_q=torch.tensor([0, 1, 5], dtype=torch.int32),
        seq_lens=torch.tensor([11, 7], dtype=torch.int32),
        block_tables=torch.zeros(2, 1, dtype=torch.int32), max_seqlen_q=4, max_seqlen_k=11)
    rows = rotary.table_rows(torch.tensor([10, 3, 4, 5, 6]), attn)
    assert rows.tolist() == [110, 3, 4, 5, 6]


def test_gemma_config_defaults_and_rope_forms() -> None:
    """What transformers' config classes default (a config.json may omit it) and both forms of
    Gemma 3's per-layer rope (transformers 5's nested rope_parameters, the older flat keys)."""
    from transformers import Gemma2Config, Gemma3TextConfig

    base = dict(vocab_size=64, hidden_size=32, num_hidden_layers=7, num_attention_heads=2,
                intermediate_size=64)
    g2 = ModelConfig.from_dict({**base, "architectures": ["Gemma2ForCausalLM"]})
    ref2 = Gemma2Config(**base)
    assert g2.layer_types == tuple(ref2.layer_types) and g2.tie_word_embeddings
    assert (g2.head_dim, g2.query_pre_attn_scalar, g2.sliding_window) == (256, 256, 4096)
    assert (g2.attn_logit_softcapping, g2.final_logit_softcapping) == (50.0, 30.0)
    assert g2.hidden_act == "gelu_pytorch_tanh"
    old = {**base, "architectures": ["Gemma3ForCausalLM"], "rope_theta": 2e6,
           "rope_local_base_freq": 5e3, "rope_scaling": {"rope_type": "linear", "factor": 8.0}}
    ref3 = Gemma3TextConfig(**{k: v for k, v in old.items() if k != "architectures"})
    for raw in (old, {**ref3.to_dict(), "architectures": ["Gemma3ForCausalLM"]}):
        g3 = ModelConfig.from_dict(raw)
        assert g3.layer_types == tuple(ref3.layer_types)
        assert (g3.rope_theta, g3.rope_scaling) == (2e6, {"rope_type": "linear", "factor": 8.0})
        assert (g3.local_rope_theta, g3.local_rope_scaling) == (5e3, None)
        assert (g3.attn_logit_softcapping, g3.final_logit_softcapping) == (0.0, 0.0)
    with pytest.raises(ValueError, match="use_bidirectional_attention"):
        ModelConfig.from_dict({**old, "use_bidirectional_attention": True})


def test_phi3_su_rope_is_longrope_with_the_top_level_original_length() -> None:
    raw = {"architectures": ["Phi3ForCausalLM"], "vocab_size": 64, "hidden_size": 32,
           "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
           "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
           "rope_scaling": {"type": "su", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}}
    config = ModelConfig.from_dict(raw)
    assert config.rope_scaling["rope_type"] == "longrope"
    assert config.rope_scaling["original_max_position_embeddings"] == 4096
