"""The gated MLP's activations; kernels.reference.activation is the specification.
act(gate) is rounded to the input dtype before the product, as torch's F.silu(gate) * up is."""

from __future__ import annotations

import torch

import triton
import triton.language as tl
from pagedserve.kernels.triton.runtime import check_device, next_pow2

BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, D: tl.constexpr,
                         BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + D + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols,
             (silu * up.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_tanh_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, D: tl.constexpr,
                              BLOCK: tl.constexpr):
    # 0.5 g (1 + tanh(u)) = g * sigmoid(2u), u = sqrt(2/pi) (g + 0.044715 g^3): no tanh needed,
    # and no cancellation for very negative g (exp overflows to inf, and g / inf is -0)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + D + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    z = g * (1.5957691216057308 + 0.07135481627159046 * g * g)
    act = (g / (1.0 + tl.exp(-z))).to(gate.dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols,
             (act * up.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2 * d] = [gate | up] -> silu(gate) * up, [..., d]."""
    return _act_and_mul(_silu_and_mul_kernel, x)


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2 * d] = [gate | up] -> gelu_tanh(gate) * up, [..., d]."""
    return _act_and_mul(_gelu_tanh_and_mul_kernel, x)


def _act_and_mul(kernel, x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    check_device(x)
    x2 = x.reshape(-1, 2 * d)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(*x.shape[:-1], d, dtype=x.dtype, device=x.device)
    block = min(BLOCK, next_pow2(d))
    if x2.shape[0]:
        kernel[(x2.shape[0], triton.cdiv(d, block))](
            x2, out, x2.stride(0), d, D=d, BLOCK=block, num_warps=4 if block >= 512 else 1,
        )
    return out
