"""Linear layers through int8 / int4 weights on the CPU (kernels/cpu/quant_gemm.c).

`pack_quantized` puts a QuantizedWeight (kernels/quantized.py) into the kernel's layout once, at
load: panels of 16 outputs whose codes stream along k, each k-pair's 16 x 2 codes interleaved
(two int4 codes a byte), scales and offsets [panel][group][16], exactly the shared form's values
(float16 where each of them is one, as GGUF's are, else float32). `quant_linear` multiplies x
(float32 or bf16; other dtypes go through float32) by it, the result in x's dtype, x multiplied
as PAGEDSERVE_QUANT_ACT (ACT) says: as given with float32 sums (float), or quantized per block
of 32 and summed exactly in int32, in two int8 passes (int8x2: a value and its residual, 2^-16 of
the block's largest) or in one as llama.cpp does (int8: faster, coarser). Unset, `default_act`
picks float or int8x2 for this CPU.

What the C path cannot take keeps the shared form itself, which `quant_linear` hands to the
reference (a dense dequantise + F.linear): a group or input count not a multiple of 4, int4 codes
outside 0..15, a weight off the CPU, or no C compiler. Slower there, never wrong.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from functools import cache

import torch

from pagedserve.kernels.cpu.build import load, omp_threads
from pagedserve.kernels.quantized import QuantizedWeight
from pagedserve.kernels.reference.quant_linear import quant_linear as reference_quant_linear

PANEL = 16  # outputs per panel, as in quant_gemm.c
# Extra compiler flags of the build in use: tests set ("-mno-avx512bf16",), ("-mno-avx512f",) and
# ("-mno-avx2",) to run the AVX-512, AVX2 and portable paths on a CPU that would pick a wider one
# (see panel_gemm.py).
BUILD_FLAGS: tuple[str, ...] = ()
# How x is multiplied, one choice for the process (every call, every row count: a row's result
# never depends on its batch, executor/batch_invariance.py); docs/benchmarks.md has the figures.
# "float": x as given, float32 sums (quant_gemm), weight-only numerics; the default, except
# where default_act finds int8x2 the faster.
# "int8x2": each row quantized per block of up to 32 inputs to integers of 2^-16 of the block's
# largest value, held as two int8 planes (a value and its residual) and multiplied with VNNI
# (quant_gemm_x8x2): below bf16's own rounding of x, SmolLM2's greedy tokens as the dequantized
# model's; about as fast as "float" at one row and 0.75-1.3x of it from 16 rows on AVX-512 BF16
# CPUs (two vpdpbusd per 4 inputs: as many multiplies as its vdpbf16ps), 0.8-1.8x on AVX2 builds.
# "int8": one plane (quant_gemm_x8), llama.cpp's numerics: the fastest from 16 rows, but an
# outlier starves its block (SmolLM2's logprobs move by up to 0.7, its first answer loses "Paris").
ENV_ACT = "PAGEDSERVE_QUANT_ACT"
ACTIVATIONS = ("float", "int8x2", "int8")
GEMMS = {"int8x2": "quant_gemm_x8x2", "int8": "quant_gemm_x8", "float": "quant_gemm"}
ACT: str = os.environ.get(ENV_ACT, "").strip()  # "": default_act()


@dataclass(frozen=True)
class PackedQuantWeight:
    codes: torch.Tensor  # [panels, in * 16 * bits / 8] uint8, the layout of quant_gemm.c
    scales: torch.Tensor  # [panels, groups, 16] float32, or float16 where that holds every scale
    # and offset exactly (GGUF's are float16): less to read. Rows past out_features: 0
    offsets: torch.Tensor | None  # like scales, or None for a symmetric weight
    out_features: int
    in_features: int
    group: int
    bits: int


_ARGTYPES = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
             ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64,
             ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int]


@dataclass(frozen=True)
class _Kernel:
    gemm: ctypes._CFuncPtr  # GEMMS[ACT], its argument types declared
    # (plain ints convert fast)
    bf16_x: bool  # multiplies bf16 x as it is (else x is widened to float32 first)
    path: str


@cache
def _build(flags: tuple[str, ...], act: str) -> _Kernel | None:
    if act not in ACTIVATIONS:
        raise ValueError(f"{ENV_ACT}={act!r}: expected one of {', '.join(ACTIVATIONS)}")
    lib = load("quant_gemm", flags)[0]
    if lib is None:
        return None
    gemm = getattr(lib, GEMMS[act])
    gemm.argtypes, gemm.restype = _ARGTYPES, ctypes.c_int
    names = lib.quant_gemm_path if act == "float" else lib.quant_gemm_x8_path
    names.restype = ctypes.c_char_p
    # int8 x is quantized from bf16 as readily as from float32, on every build
    return _Kernel(gemm, act != "float" or bool(lib.quant_gemm_features() & 1), names().decode())


@cache
def default_act(x_bf16: bool = True) -> str:
    """"float", except for bf16 x on a CPU whose vdpbf16ps does half the work of a float32 FMA
    (the probe of panel_gemm512.preferred: Intel's AVX-512 cores without AMX) and which has
    AVX-512 VNNI: there the float path's bf16 products run at half rate, and int8x2's vpdpbusd
    multiply 4 inputs an instruction, its error below bf16's own rounding of x. On an Intel Xeon
    (family 6, model 207) int8x2 took 1.1-2.2x less time than float at 1 row and 1.4-3.2x less
    at 4-64 (docs/benchmarks.md, bench.quant_gemm). Float32 x keeps float: its tiles are FMAs
    already, and int8x2 would be coarser than its x."""
    from pagedserve.kernels.cpu import panel_gemm512

    if not x_bf16 or not panel_gemm512.preferred():
        return "float"
    built = _build((), "int8x2")
    return "int8x2" if built is not None and built.path == "avx512-vnni" else "float"


def act(dtype: torch.dtype = torch.bfloat16) -> str:
    """How x of `dtype` is multiplied in this process: ACT if set, else default_act()."""
    return ACT or default_act(dtype == torch.bfloat16)


def _kernel(dtype: torch.dtype = torch.bfloat16) -> _Kernel | None:
    return _build(BUILD_FLAGS, act(dtype))


def path(dtype: torch.dtype = torch.bfloat16) -> str | None:
    """The tiles the built library runs for x of `dtype`, or None: for "float" 'avx512-bf16',
    'avx512', 'avx2' or 'scalar'; for "int8" and "int8x2" 'avx512-vnni', 'avx-vnni', 'avx2' or
    'scalar'."""
    kernel = _kernel(dtype)
    return None if kernel is None else kernel.path


def _supported(weight: QuantizedWeight) -> bool:
    in_features = weight.shape[1]
    if weight.q.device.type != "cpu" or weight.group % 4 or in_features % 4:
        return False
    if weight.bits == 4 and weight.q.numel() and int(weight.q.max()) > 15:
        return False  # a nibble cannot hold it: the reference multiplies it as given
    return _kernel() is not None


def _panels(t: torch.Tensor, fill: int = 0) -> torch.Tensor:
    """[out, ...] -> [panels, 16, ...], the last panel padded with `fill`."""
    out = t.shape[0]
    panels = -(-out // PANEL)
    padded = t.new_full((panels * PANEL, *t.shape[1:]), fill)
    padded[:out] = t
    return padded.view(panels, PANEL, *t.shape[1:])


def _pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """byte 2j + t of block b: q[16p + j][2b + t] (int8), or q[16p + j][4b + t] in the low
    nibble and q[16p + j][4b + 2 + t] in the high one (int4)."""
    codes = _panels(q.view(torch.uint8) if bits == 8 else q)  # [P, 16, K]
    p, _, k = codes.shape
    if bits == 8:
        return codes.view(p, PANEL, k // 2, 2).permute(0, 2, 1, 3).reshape(p, -1).contiguous()
    quads = codes.view(p, PANEL, k // 4, 2, 2).permute(0, 2, 3, 1, 4)  # [P, K/4, half, 16, t]
    return (quads[:, :, 0] | (quads[:, :, 1] << 4)).reshape(p, -1).contiguous()


def _exact_in_half(t: torch.Tensor) -> bool:
    return bool(t.isfinite().all()) and torch.equal(t.half().float(), t)


def pack_quantized(weight: QuantizedWeight) -> PackedQuantWeight | QuantizedWeight:
    """The kernel's layout of `weight`, or the weight itself where the C path cannot take it."""
    if not _supported(weight):
        return weight
    out_features, in_features = weight.shape

    tables = [t for t in (weight.scale, weight.offset) if t is not None]
    half = all(_exact_in_half(t) for t in tables)

    def grouped(t: torch.Tensor) -> torch.Tensor:
        t = _panels(t.detach()).transpose(1, 2).contiguous()  # [P, groups, 16]
        return t.half() if half else t

    return PackedQuantWeight(
        _pack_codes(weight.q.detach(), weight.bits), grouped(weight.scale),
        None if weight.offset is None else grouped(weight.offset),
        out_features, in_features, weight.group, weight.bits)


def quant_linear(x: torch.Tensor, packed: PackedQuantWeight | QuantizedWeight,
                 bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, dequantized weight, bias) for x [..., in]; the result in x's dtype."""
    if isinstance(packed, QuantizedWeight) or x.device.type != "cpu":
        if not isinstance(packed, QuantizedWeight):
            raise ValueError("a weight packed for the CPU kernel multiplies CPU tensors only")
        return reference_quant_linear(x, packed, bias)
    lead, k = x.shape[:-1], x.shape[-1]
    if k != packed.in_features:
        raise ValueError(f"x has {k} inputs, the weight {packed.in_features}")
    kernel = _kernel(x.dtype)
    rows = x if x.dim() == 2 else x.reshape(-1, k)  # reshape costs a microsecond a call
    if rows.dtype != torch.float32 and not (rows.dtype == torch.bfloat16 and kernel.bf16_x):
        rows = rows.float()  # float16, or bf16 on a CPU without AVX-512 BF16
    if rows.shape[0] > 0 and rows.stride(1) != 1:
        rows = rows.contiguous()
    out_dtype = x.dtype if x.dtype in (torch.float32, torch.bfloat16) else torch.float32
    out = torch.empty(rows.shape[0], packed.out_features, dtype=out_dtype)
    if bias is not None:
        bias = bias.to(torch.float32).contiguous()  # held here: the C call gets its address
    if rows.shape[0]:
        _call(kernel, rows, packed, bias, out)
    if out.dtype != x.dtype:
        out = out.to(x.dtype)
    return out if x.dim() == 2 else out.view(*lead, packed.out_features)


def _call(kernel: _Kernel, rows: torch.Tensor, packed: PackedQuantWeight,
          bias: torch.Tensor | None, out: torch.Tensor) -> None:
    failed = kernel.gemm(
        rows.data_ptr(), rows.stride(0), rows.dtype == torch.bfloat16, packed.codes.data_ptr(),
        packed.scales.data_ptr(), None if packed.offsets is None else packed.offsets.data_ptr(),
        packed.scales.dtype == torch.float16,
        None if bias is None else bias.data_ptr(), out.data_ptr(), out.dtype == torch.bfloat16,
        rows.shape[0], packed.out_features, packed.in_features, packed.group, packed.bits,
        omp_threads())
    if failed:
        raise MemoryError("quant_gemm could not allocate its scratch buffers")
