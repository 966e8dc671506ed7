"""Linear layers through int8 / int4 weights (W8A16 / W4A16): kernels.reference.quant_linear is
the specification, kernels/cpu/quant_gemm.c the CPU twin of the same arithmetic.

Per tile of BLOCK_K inputs (inside one group) the program multiplies x by the integer codes
themselves, exact in x's dtype, with float32 sums, then applies the group's scale and offset:

    acc[m, n] += scale[g, n] * (x_tile @ q_tile)[m, n] + offset[g, n] * sum(x_tile[m, :])

so the weight is never rounded to x's dtype and the result differs from the reference only by
float32 summation order. Layout (`pack_quantized`), the codes transposed so a tile loads along n:

    int8: codes [K, N] int8
    int4: codes [K / 2, N] uint8; in each tile of BLOCK_K inputs starting at k0, byte row
          k0 / 2 + i holds input k0 + i (low nibble) and k0 + BLOCK_K / 2 + i (high nibble),
          so one load gives two [BLOCK_K / 2, N] halves, each a tl.dot of its own

scales and offsets [groups, N] float32. A group that is not a multiple of 16 (tl.dot's smallest
K; 32 for int4) keeps the shared form, which `quant_linear` hands to the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import triton
import triton.language as tl
from pagedserve.kernels.quantized import QuantizedWeight
from pagedserve.kernels.reference.quant_linear import quant_linear as reference_quant_linear
from pagedserve.kernels.triton.runtime import INTERPRETING, check_device, dot_in_fp32


@dataclass(frozen=True)
class TritonQuantWeight:
    codes: torch.Tensor  # [K, N] int8, or [K / 2, N] uint8 (two int4 codes a byte, see above)
    scales: torch.Tensor  # [groups, N] float32
    offsets: torch.Tensor | None  # [groups, N] float32, or None (symmetric)
    out_features: int
    in_features: int
    group: int
    bits: int
    block_k: int  # inputs per tile (divides the group); the int4 layout depends on it


def _block_k(group: int, bits: int) -> int | None:
    """The largest tile of 64, 32 or 16 inputs inside a group (int4: halves of at least 16)."""
    for block in (64, 32, 16):
        if group % block == 0 and (bits == 8 or block >= 32):
            return block
    return None


def pack_quantized(weight: QuantizedWeight) -> TritonQuantWeight | QuantizedWeight:
    """This kernel's layout of `weight`, or the weight itself where the kernel cannot take it."""
    block = _block_k(weight.group, weight.bits)
    if block is None or (weight.bits == 4 and weight.q.numel() and int(weight.q.max()) > 15):
        return weight
    out_features, in_features = weight.shape
    q = weight.q.detach().t()  # [K, N]
    if weight.bits == 4:
        tiles = q.reshape(in_features // block, 2, block // 2, out_features)
        q = tiles[:, 0] | (tiles[:, 1] << 4)  # [K / block, block / 2, N]
        q = q.reshape(in_features // 2, out_features)
    offsets = None if weight.offset is None else weight.offset.detach().t().contiguous()
    return TritonQuantWeight(q.contiguous(), weight.scale.detach().t().contiguous(), offsets,
                             out_features, in_features, weight.group, weight.bits, block)


@triton.jit
def _dot(a, b, DOT_FP32: tl.constexpr):
    if DOT_FP32:  # fp32 operands (no tf32), or the interpreter, whose bf16 tl.dot is wrong
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b.to(a.dtype))  # the codes are small integers: exact in x's dtype
    return c


@triton.jit
def _x_tile(x_ptr, rows, row_ok, stride_x, k0, BLOCK: tl.constexpr):
    ks = k0 + tl.arange(0, BLOCK)
    return tl.load(x_ptr + rows[:, None] * stride_x + ks[None, :], mask=row_ok[:, None], other=0.0)


@triton.jit(do_not_specialize=["M"])
def _quant_linear_kernel(
    x_ptr,  # [M, K]
    q_ptr,  # codes, see the module docstring
    s_ptr, o_ptr,  # [groups, N] float32
    b_ptr,  # [N] float32 or unused
    y_ptr,  # [M, N], x's dtype
    M, stride_x, stride_y,
    N: tl.constexpr, K: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr,
    HAS_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < N
    HALF: tl.constexpr = BLOCK_K // 2
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if BITS == 8:
            x = _x_tile(x_ptr, rows, row_ok, stride_x, k0, BLOCK_K)
            ks = k0 + tl.arange(0, BLOCK_K)
            q = tl.load(q_ptr + ks[:, None] * N + cols[None, :], mask=col_ok[None, :], other=0)
            part = _dot(x, q, DOT_FP32)
            xsum = tl.sum(x.to(tl.float32), axis=1)
        else:
            x0 = _x_tile(x_ptr, rows, row_ok, stride_x, k0, HALF)
            x1 = _x_tile(x_ptr, rows, row_ok, stride_x, k0 + HALF, HALF)
            ks = k0 // 2 + tl.arange(0, HALF)
            b = tl.load(q_ptr + ks[:, None] * N + cols[None, :], mask=col_ok[None, :], other=0)
            b = b.to(tl.int32)
            part = _dot(x0, b & 15, DOT_FP32) + _dot(x1, b >> 4, DOT_FP32)
            xsum = tl.sum(x0.to(tl.float32), axis=1) + tl.sum(x1.to(tl.float32), axis=1)
        g = k0 // GROUP
        scale = tl.load(s_ptr + g * N + cols, mask=col_ok, other=0.0)
        acc += part * scale[None, :]
        if HAS_OFFSET:
            offset = tl.load(o_ptr + g * N + cols, mask=col_ok, other=0.0)
            acc += xsum[:, None] * offset[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0)[None, :]
    out = y_ptr + rows[:, None] * stride_y + cols[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def quant_linear(x: torch.Tensor, packed: TritonQuantWeight | QuantizedWeight,
                 bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, dequantized weight, bias) for x [..., in]; the result in x's dtype."""
    if isinstance(packed, QuantizedWeight):
        return reference_quant_linear(x, packed, bias)
    check_device(x, packed.codes)
    lead, k = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, k)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    m, n = rows.shape[0], packed.out_features
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m:
        bias32 = None if bias is None else bias.to(torch.float32).contiguous()
        block_m = 16 if m <= 16 else 32 if INTERPRETING else 64
        grid = (triton.cdiv(m, block_m), triton.cdiv(n, 64))
        _quant_linear_kernel[grid](
            rows, packed.codes, packed.scales,
            packed.scales if packed.offsets is None else packed.offsets,
            packed.scales if bias32 is None else bias32, y, m, rows.stride(0), y.stride(0),
            N=n, K=k, GROUP=packed.group, BITS=packed.bits, HAS_OFFSET=packed.offsets is not None,
            HAS_BIAS=bias32 is not None, BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=packed.block_k,
            DOT_FP32=dot_in_fp32(x.dtype))
    return y.view(*lead, n)
