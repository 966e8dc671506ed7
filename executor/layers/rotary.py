"""Rotary position embedding: the cos/sin table, built exactly as transformers builds it.

cos_sin_cache[pos] = [cos(pos * f_0 .. f_{r/2-1}) | sin(same)] in float32 for rotary dimension r,
with f_i = 1 / theta ** (2i / r), rescaled per `rope_scaling`. The products pos * f_i are taken in
float32 as transformers does (not float64): matching its rounding is what keeps logits within 1e-5
at long positions.
"""

from __future__ import annotations

import math
from types import ModuleType

import torch
from torch import nn

from pagedserve.executor.attention_metadata import AttentionMetadata

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "freq_factors", "longrope")


def _llama3_scale(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1 frequency scaling: long wavelengths (> original_len / low_freq_factor) slow down by
    `factor`, short ones (< original_len / high_freq_factor) stay, and the band between blends the
    two linearly in original_len / wavelength. Same operation order as transformers, for bitwise
    equal tables."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    slowed = torch.where(wavelen > original_len / low, inv_freq / factor, inv_freq)
    smooth = (original_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * slowed / factor + smooth * slowed
    in_band = ~(wavelen < original_len / high) * ~(wavelen > original_len / low)
    return torch.where(in_band, blended, slowed)


def rope_inv_freq(rotary_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """[rotary_dim / 2] float32 inverse frequencies."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    inv_freq = 1.0 / (theta**exponents)
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        return _llama3_scale(inv_freq, scaling)
    if rope_type == "freq_factors":  # a GGUF's rope_freqs tensor: llama.cpp divides by each
        return inv_freq / torch.tensor(scaling["factors"], dtype=torch.float32)
    if rope_type == "longrope":
        # two tables and a per-sequence choice: LongRopeEmbedding (make_rotary), not one inv_freq
        raise ValueError("rope_scaling: longrope runs only in models that build their rotary "
                         "with make_rotary (Phi-3)")
    raise ValueError(
        f"rope_scaling: unsupported rope_type {rope_type!r} in {scaling}; "
        f"supported: {SUPPORTED_ROPE_TYPES}"
    )


def longrope_parameters(
    rotary_dim: int, theta: float, scaling: dict, max_positions: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """LongRoPE (Phi-3's "su"): (short inv_freq, long inv_freq, attention factor). Each frequency
    is divided by its own factor, short_factor within the original (pretraining) length and
    long_factor past it; cos and sin are scaled by sqrt(1 + ln(s) / ln(original)), s the context
    extension max_positions / original (or `factor`), unless `attention_factor` is given. Same
    operations and order as transformers' longrope init, for bitwise equal tables."""
    original = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or max_positions / original
    attention = scaling.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim

    def inv_freq(factors: list[float]) -> torch.Tensor:
        if len(factors) != rotary_dim // 2:
            raise ValueError(f"rope_scaling: longrope needs {rotary_dim // 2} factors per table "
                             f"(rotary dimension {rotary_dim} / 2), got {len(factors)}")
        return 1.0 / (torch.tensor(factors, dtype=torch.float32) * theta**exponents)

    return inv_freq(scaling["short_factor"]), inv_freq(scaling["long_factor"]), attention


def build_cos_sin_cache(
    rotary_dim: int, max_positions: int, theta: float, scaling: dict | None,
    inv_freq: torch.Tensor | None = None,
) -> torch.Tensor:
    """[max_positions, rotary_dim] float32, on the current default device (from `inv_freq` when
    given, else from theta and scaling)."""
    if inv_freq is None:
        inv_freq = rope_inv_freq(rotary_dim, theta, scaling)
    positions = torch.arange(max_positions, dtype=torch.int64).float()
    freqs = positions[:, None] * inv_freq.to(positions.device)[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


class RotaryEmbedding(nn.Module):
    """Rotates q and k in place; neox pairing (dimension j with j + r/2) as Llama, Mistral, Qwen."""

    def __init__(
        self,
        rotary_dim: int,
        max_positions: int,
        theta: float,
        scaling: dict | None,
        backend: ModuleType,
    ):
        super().__init__()
        self.backend = backend
        with torch.device("cpu"):  # once, at load, whatever device the model is being built on
            cache = build_cos_sin_cache(rotary_dim, max_positions, theta, scaling)
        # Not persistent: derived from the config, never in a checkpoint.
        self.register_buffer(
            "cos_sin_cache", cache.to(torch.get_default_device()), persistent=False
        )

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> None:
        self.backend.rotary_embedding(positions, q, k, self.cos_sin_cache, is_neox=True)

    def table_rows(self, positions: torch.Tensor, attn: AttentionMetadata) -> torch.Tensor:
        """The cos_sin_cache rows this step's tokens read (what `forward` takes as positions):
        the positions themselves, but for LongRoPE. Once per step, not per layer."""
        return positions


class LongRopeEmbedding(RotaryEmbedding):
    """LongRoPE: the short table in rows [0, max_positions), the long one after it.

    transformers picks the table per forward: long when the batch's highest position reaches past
    the original length, for every token of that forward. Here the choice is per sequence: a
    step's tokens use the long table when their sequence's context (seq_lens) is past the original
    length. That is transformers' generate for one sequence whose prompt goes in whole (a long
    prompt is long throughout; a short one turns long at the first decode token past the
    original length, its earlier keys staying short in the cache), and it does not depend on the
    batch. A prompt cut into chunks across the boundary has its earlier chunks short, and a
    cached prefix keeps the table it was computed with."""

    def __init__(self, rotary_dim: int, max_positions: int, theta: float, scaling: dict,
                 backend: ModuleType):
        nn.Module.__init__(self)
        self.backend, self.max_positions = backend, max_positions
        self.original = scaling["original_max_position_embeddings"]
        with torch.device("cpu"):
            short, long, attention = longrope_parameters(rotary_dim, theta, scaling, max_positions)
            cache = torch.cat([build_cos_sin_cache(rotary_dim, max_positions, theta, None, f)
                               for f in (short, long)]) * attention
        self.register_buffer(
            "cos_sin_cache", cache.to(torch.get_default_device()), persistent=False
        )

    def table_rows(self, positions: torch.Tensor, attn: AttentionMetadata) -> torch.Tensor:
        cu, seq_lens = attn.cu_seqlens_q, attn.seq_lens
        tokens = torch.arange(positions.shape[0], dtype=cu.dtype, device=cu.device)
        seq = torch.searchsorted(cu[1:], tokens, right=True).clamp_max(seq_lens.shape[0] - 1)
        return positions + self.max_positions * (seq_lens[seq] > self.original)


def make_rotary(rotary_dim: int, max_positions: int, theta: float, scaling: dict | None,
                backend: ModuleType) -> RotaryEmbedding:
    """The rotary module for a rope type (LongRoPE keeps two tables)."""
    if (scaling or {}).get("rope_type") == "longrope":
        return LongRopeEmbedding(rotary_dim, max_positions, theta, scaling, backend)
    return RotaryEmbedding(rotary_dim, max_positions, theta, scaling, backend)
