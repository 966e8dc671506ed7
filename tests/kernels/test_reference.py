"""The reference kernels against independent formulas: dense attention through torch SDPA on the
gathered context, and transformers' own Llama rotary embedding and RMSNorm."""

from __future__ import annotations

import pytest
import torch

from pagedserve.kernels import reference
from tests.kernels.common import dense_attention, make_batch, poisoned, rel_err

CPU = torch.device("cpu")


@pytest.mark.parametrize(("q_lens", "seq_lens", "window", "softcap"), [
    ([1, 1, 1, 1], [1, 16, 17, 40], 0, 0.0),  # decode batch: the reference's batched path
    ([5, 1, 12, 0, 1], [5, 30, 20, 7, 3], 0, 0.0),  # prefill, chunk with cached prefix, decode
    ([4, 1, 9, 1], [20, 33, 9, 12], 6, 0.0),  # sliding window shorter than the contexts
    ([3, 1, 1], [19, 25, 8], 50, 20.0),  # window longer than the contexts, softcap
])
def test_reference_attention_matches_dense_sdpa(q_lens, seq_lens, window, softcap) -> None:
    batch = make_batch(q_lens, seq_lens, num_q_heads=8, num_kv_heads=2, head_dim=32,
                       block_size=8, dtype=torch.float32,
                       shared_blocks=min(seq_lens[0], seq_lens[1]) // 8)
    batch = type(batch)(*(t.cpu() if isinstance(t, torch.Tensor) else t
                          for t in vars(batch).values()))
    out = poisoned(batch.q.shape, torch.float32, CPU)
    reference.paged_attention(*batch.args(), out, scale=0.3, sliding_window=window,
                              softcap=softcap, **batch.bounds())
    assert rel_err(out, dense_attention(batch, 0.3, window, softcap)) < 1e-5


def _llama3_config(head_dim: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=head_dim * 4, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=4096, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 256},
    )


def test_reference_rotary_matches_transformers_llama3() -> None:
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    head_dim, tokens = 64, 37
    rope = LlamaRotaryEmbedding(_llama3_config(head_dim))
    positions = torch.randint(0, 4096, (tokens,))
    freqs = positions[:, None].float() * rope.inv_freq[None, :].float()
    cache = torch.zeros(4096, head_dim)
    cache[positions] = torch.cat((freqs.cos(), freqs.sin()), -1) * rope.attention_scaling
    q, k = torch.randn(tokens, 4, head_dim), torch.randn(tokens, 2, head_dim)
    cos, sin = rope(q, positions[None])  # [1, tokens, head_dim]
    q_hf, k_hf = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    reference.rotary_embedding(positions, q, k, cache, is_neox=True)
    torch.testing.assert_close(q, q_hf[0].transpose(0, 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k, k_hf[0].transpose(0, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gptj_rotary_matches_transformers(backend: str) -> None:
    """gpt-j pairing (is_neox=False: dimensions 2j and 2j + 1 turn together) against transformers'
    GPT-J code: its sinusoid table (sin | cos) as our cos | sin cache, its apply_rotary_pos_emb on
    the rotary part of each head and the rest untouched, as GPT-J rotates 64 of 256. Both the
    reference and the CPU backend's entry point (which hands this pairing to the reference)."""
    from transformers.models.gptj import modeling_gptj as gptj

    from pagedserve.kernels import cpu

    rotary = {"reference": reference.rotary_embedding, "cpu": cpu.rotary_embedding}[backend]
    head_dim, rot, tokens = 64, 32, 37
    sin, cos = gptj.create_sinusoidal_positions(2048, rot).chunk(2, dim=-1)
    positions = torch.randint(0, 2048, (tokens,))
    q, k = torch.randn(tokens, 4, head_dim), torch.randn(tokens, 2, head_dim)
    want = [torch.cat((gptj.apply_rotary_pos_emb(t[None, ..., :rot], sin[positions][None],
                                                 cos[positions][None])[0], t[..., rot:]), dim=-1)
            for t in (q, k)]
    rotary(positions, q, k, torch.cat((cos, sin), dim=-1), is_neox=False)
    torch.testing.assert_close(q, want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k, want[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_rms_norm_matches_transformers(dtype) -> None:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(96, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(96))
    x = torch.randn(3, 5, 96).to(dtype)
    with torch.no_grad():
        torch.testing.assert_close(reference.rms_norm(x, norm.weight, 1e-5), norm(x),
                                   rtol=0, atol=0)
