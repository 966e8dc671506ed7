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

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "freq_factors")


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
    raise ValueError(
        f"rope_scaling: unsupported rope_type {rope_type!r} in {scaling}; "
        f"supported: {SUPPORTED_ROPE_TYPES}"
    )


def build_cos_sin_cache(
    rotary_dim: int, max_positions: int, theta: float, scaling: dict | None
) -> torch.Tensor:
    """[max_positions, rotary_dim] float32, on the current default device."""
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
