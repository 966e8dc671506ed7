"""Linear layers through quantized weights (kernels/quantized.py's form): the specification. The
weight is dequantized in float32 and multiplied with x in float32; the result is rounded once to
x's dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pagedserve.kernels.quantized import QuantizedWeight


def pack_quantized(weight: QuantizedWeight) -> QuantizedWeight:
    """This backend multiplies the shared form itself."""
    return weight


def quant_linear(x: torch.Tensor, packed: QuantizedWeight,
                 bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, dequantized weight, bias) for x [rows, in]."""
    y = F.linear(x.to(torch.float32), packed.dequantize(torch.float32),
                 None if bias is None else bias.to(torch.float32))
    return y.to(x.dtype)
