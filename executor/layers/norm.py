"""RMSNorm as a module; the arithmetic is the kernel backend's (executor/backend.py picks it)."""

from __future__ import annotations

from types import ModuleType

import torch
from torch import nn

from pagedserve.executor.layers.linear import default_weight_loader, new_param


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, backend: ModuleType):
        super().__init__()
        self.eps, self.backend = eps, backend
        self.weight = new_param(hidden_size)
        self.weight.weight_loader = default_weight_loader
        self.weight.shard_ids = (None,)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x); or, given the residual stream, (norm(residual + x), residual + x) with the
        residual updated in place: the add and the norm read x once."""
        if residual is None:
            return self.backend.rms_norm(x, self.weight, self.eps)
        return self.backend.fused_add_rms_norm(x, residual, self.weight, self.eps)
