"""The gated MLP's activations: act(gate) * up, with act rounded to the input dtype before the
product, as transformers' act_fn(gate_proj(x)) * up_proj(x) is."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2 * d] = [gate | up] -> silu(gate) * up, [..., d]."""
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2 * d] = [gate | up] -> gelu_tanh(gate) * up, [..., d] (Gemma's
    `gelu_pytorch_tanh`: 0.5 g (1 + tanh(sqrt(2 / pi) (g + 0.044715 g^3))))."""
    d = x.shape[-1] // 2
    return F.gelu(x[..., :d], approximate="tanh") * x[..., d:]
