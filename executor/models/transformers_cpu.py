"""The fallback's linear layers on the CPU: transformers' nn.Linear modules swapped for ones that
multiply through a packed copy of the weight (layers/cpu_gemm.py), as the native layers do.

F.linear re-lays a bf16 weight out on every call, which at decode sizes costs as much as the
multiply. As in the native layers, the packed copy is the only one kept (the module's `weight`
becomes a shape on the meta device), so packing costs no memory; a weight shared with another
module (a tied LM head) stays as it is. The loader checks the packed model's output against the
unpacked one's and puts the originals back if it differs or fails (a model that reads a weight's
values in its forward).
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from pagedserve.executor.layers.cpu_gemm import PackedWeight, pack_weight, packed_linear, shape_only

Swap = tuple[nn.Module, str, nn.Linear]  # (parent, attribute, the original module)


class PackedLinear(nn.Module):
    """nn.Linear's interface over a packed weight."""

    def __init__(self, linear: nn.Linear, packed: PackedWeight):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = shape_only(linear.weight)
        self.bias = linear.bias
        self.packed = packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = packed_linear(x.reshape(-1, x.shape[-1]), self.packed, self.bias)
        return rows.view(*x.shape[:-1], rows.shape[-1])


def pack_linears(model: nn.Module) -> list[Swap]:
    """Swap every packable CPU nn.Linear of `model` for a PackedLinear; returns the swaps (for
    unpack_linears)."""
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    swaps: list[Swap] = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear or uses[id(child.weight)] > 1:
                continue
            packed = pack_weight(child.weight.detach(), child.bias)
            if packed is not None:
                setattr(parent, name, PackedLinear(child, packed))
                swaps.append((parent, name, child))
    return swaps


def unpack_linears(swaps: list[Swap]) -> None:
    for parent, name, original in swaps:
        setattr(parent, name, original)
