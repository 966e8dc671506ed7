"""A Llama-family decoder's layers in one C call (layer_loop.c), over the kernels the Python
path calls one by one: results equal to that path's bit for bit, without its per-call glue.

`LayerLoop` holds, once, what every step passes unchanged (each layer's packed weights, norms,
KV pages and attention constants, and the kernels' addresses); `run` adds the step's rows and
index tensors. The model side decides when a model qualifies (executor/models/layer_loop.py).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from pagedserve.kernels.cpu import panel_gemm, panel_gemm512
from pagedserve.kernels.cpu.attention import decode_rows
from pagedserve.kernels.cpu.build import load, omp_threads, typed_function
from pagedserve.kernels.cpu.kv_write import KINDS
from pagedserve.kernels.cpu.quant_linear import PackedQuantWeight, _kernel

_P, _I64, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float


class _Gemm(ctypes.Structure):
    _fields_ = [("codes", _P), ("scales", _P), ("offsets", _P), ("bias", _P), ("n", _I64),
                ("k", _I64), ("group", _I64), ("bits", _I), ("half_scales", _I), ("kind", _I)]


_QUANT, _PANELS_F32, _PANELS_BF16, _PAIRS = range(4)  # layer_loop.c's GEMM_*


class _Layer(ctypes.Structure):
    _fields_ = [("qkv", _Gemm), ("o", _Gemm), ("gate_up", _Gemm), ("down", _Gemm),
                ("input_norm", _P), ("post_norm", _P), ("q_norm", _P), ("k_norm", _P),
                ("k_cache", _P), ("v_cache", _P),
                ("scale", _F), ("softcap", _F), ("k_scale", _F), ("v_scale", _F),
                ("sliding_window", _I)]


class _Decoder(ctypes.Structure):
    _fields_ = [(name, _P) for name in ("gemm", "rms_norm", "rms_norm_heads", "add_rms_norm", "rotary", "write_kv",
                                        "paged_decode", "silu_and_mul", "panels_f32",
                                        "panels_bf16", "pairs", "layers", "final_norm",
                                        "cos_sin")] + [
        (name, _I) for name in ("num_layers", "hidden", "num_heads", "num_kv_heads", "head_dim",
                                "intermediate", "rot", "bf16", "x_bf16", "block_size", "kind")
    ] + [("num_slots", _I64), ("eps", _F)]


class _Step(ctypes.Structure):
    _fields_ = [("rows", _I64)] + [(name, _P) for name in (
        "residual", "normed", "qkv", "attn", "proj", "gate_up", "act", "out", "positions",
        "slots", "seqs", "q_rows", "seq_lens", "block_tables")] + [
        ("block_table_stride", _I64), ("count", _I), ("threads", _I)]


@dataclass
class LoopLinear:
    """A projection as the loop multiplies it: quantized in quant_gemm's packed form, or a dense
    weight in panel_gemm's panels (a float32 model) or panel_gemm512's pairs (a bf16 one)."""

    # panels: [panels, in, 16] float32 or bf16; pairs: [panels, in, 32] bf16
    weight: PackedQuantWeight | torch.Tensor
    bias: torch.Tensor | None
    out_features: int


@dataclass
class LoopLayer:
    """One decoder layer as the loop takes it."""

    qkv: LoopLinear
    o: LoopLinear
    gate_up: LoopLinear
    down: LoopLinear
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    k_cache: torch.Tensor  # [blocks, block_size, kv_heads, head_dim], the activations' dtype
    v_cache: torch.Tensor
    scale: float
    softcap: float
    sliding_window: int
    k_scale: float
    v_scale: float
    q_norm: torch.Tensor | None = None  # per-head norms before rotary (Qwen3)
    k_norm: torch.Tensor | None = None


@dataclass(frozen=True)
class LoopShape:
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    eps: float


def unavailable(dtype: torch.dtype) -> str:
    """Why the loop cannot run activations of `dtype` on this machine ("" when it can)."""
    if dtype not in (torch.float32, torch.bfloat16):
        return f"activations in {dtype} (the loop takes float32 and bf16)"
    for name in ("layer_loop", "norm", "rotary", "kv_write", "paged_decode", "activation"):
        lib, why = load(name)
        if lib is None:
            return why
    return ""


def takes(linear: LoopLinear, dtype: torch.dtype) -> str:
    """Why the loop cannot multiply through `linear` with activations of `dtype` ("" if it can)."""
    if isinstance(linear.weight, torch.Tensor) and _is_pairs(linear.weight):
        if dtype != torch.bfloat16 or not panel_gemm512.available():
            return "paired panels multiply bf16 activations, on CPUs with AVX-512"
        return ""
    if isinstance(linear.weight, torch.Tensor):
        if dtype != torch.float32 or not panel_gemm.available():
            return "panels multiply float32 activations, on CPUs with AVX2 and no AVX-512"
        return ""
    kernel = _kernel(dtype)
    if kernel is None:
        return "the quantized GEMM did not build"
    if dtype == torch.bfloat16 and not kernel.bf16_x:
        return "the quantized GEMM widens bf16 to float32 on this CPU (no AVX-512 BF16)"
    return ""


def _is_pairs(weight: torch.Tensor) -> bool:
    return weight.shape[-1] == panel_gemm512.PANEL


def _address(fn) -> int:
    return ctypes.cast(fn, ctypes.c_void_p).value


def _gemm(linear: LoopLinear, keep: list[torch.Tensor]) -> _Gemm:
    w = linear.weight
    bias = None if linear.bias is None else linear.bias.to(torch.float32).contiguous()
    keep.extend(t for t in (bias,) if t is not None)
    bias_ptr = None if bias is None else bias.data_ptr()
    if isinstance(w, torch.Tensor):  # panels
        keep.append(w)
        kind = (_PAIRS if _is_pairs(w) else _PANELS_BF16 if w.dtype == torch.bfloat16
                else _PANELS_F32)
        return _Gemm(w.data_ptr(), None, None, bias_ptr, linear.out_features, w.shape[1], 0, 0,
                     0, kind)
    keep.extend(t for t in (w.codes, w.scales, w.offsets) if t is not None)
    return _Gemm(w.codes.data_ptr(), w.scales.data_ptr(),
                 None if w.offsets is None else w.offsets.data_ptr(), bias_ptr, w.out_features,
                 w.in_features, w.group, w.bits, int(w.scales.dtype == torch.float16), _QUANT)


def _layer(layer: LoopLayer, keep: list[torch.Tensor]) -> _Layer:
    heads = (layer.q_norm, layer.k_norm)
    keep.extend((layer.input_norm, layer.post_norm, layer.k_cache, layer.v_cache))
    keep.extend(t for t in heads if t is not None)
    return _Layer(*(_gemm(g, keep) for g in (layer.qkv, layer.o, layer.gate_up, layer.down)),
                  layer.input_norm.data_ptr(), layer.post_norm.data_ptr(),
                  *(None if t is None else t.data_ptr() for t in heads),
                  layer.k_cache.data_ptr(), layer.v_cache.data_ptr(), layer.scale,
                  layer.softcap, layer.k_scale, layer.v_scale, layer.sliding_window)


class LayerLoop:
    def __init__(self, layers: list[LoopLayer], final_norm: torch.Tensor,
                 cos_sin_cache: torch.Tensor, shape: LoopShape, dtype: torch.dtype) -> None:
        why = unavailable(dtype)
        if why:
            raise ValueError(f"layer loop: {why}")
        self.shape, self.dtype = shape, dtype
        self._keep: list[torch.Tensor] = [final_norm, cos_sin_cache]
        self._layers = (_Layer * len(layers))(*(_layer(layer, self._keep) for layer in layers))
        cache = layers[0].k_cache
        self._decoder = _Decoder(*self._functions(dtype), ctypes.addressof(self._layers),
                                 final_norm.data_ptr(), cos_sin_cache.data_ptr(), len(layers),
                                 shape.hidden, shape.num_heads, shape.num_kv_heads,
                                 shape.head_dim, shape.intermediate, cos_sin_cache.shape[1],
                                 int(dtype == torch.bfloat16), int(dtype == torch.bfloat16),
                                 cache.shape[1], KINDS[dtype], cache.shape[0] * cache.shape[1],
                                 shape.eps)
        self._run = load("layer_loop")[0].layer_loop
        self._run.argtypes, self._run.restype = [_P, _P], ctypes.c_int

    @staticmethod
    def _functions(dtype: torch.dtype) -> list[int]:
        typed = [typed_function(lib, symbol, dtype) for lib, symbol in (
            ("norm", "rms_norm"), ("norm", "rms_norm_heads"), ("norm", "add_rms_norm"), ("rotary", "rotary_neox"))]
        kernel, panels = _kernel(dtype), panel_gemm._lib() if panel_gemm.available() else None
        return [kernel and _address(kernel.gemm), *map(_address, typed),
                _address(load("kv_write")[0].write_kv), _address(load("paged_decode")[0].paged_decode),
                _address(typed_function("activation", "silu_and_mul", dtype)),
                *(panels and _address(getattr(panels, name))
                  for name in ("panel_gemm_f32", "panel_gemm_f32_bf16_panels")),
                _address(panel_gemm512._lib().panel_gemm512_bf16_x)
                if panel_gemm512.available() else None]

    def run(self, residual: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
            cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
            block_tables: torch.Tensor) -> torch.Tensor | None:
        """The final-norm hidden states [T, hidden] of the embeddings `residual` [T, hidden]
        (used as the residual stream: overwritten), or None, touching nothing, when the step's
        tensors are not in a layout the kernels take (the caller runs its layers then)."""
        index = (cu_seqlens_q, seq_lens, block_tables)
        if not (residual.dtype == self.dtype and residual.is_contiguous()
                and slot_mapping.dtype == torch.int64 and slot_mapping.is_contiguous()
                and all(t.dtype == torch.int32 and t.is_contiguous() for t in index)):
            return None
        seqs, q_rows, lens, tables = decode_rows(*index)
        s, t = self.shape, residual.shape[0]
        positions = positions.to(torch.int64).contiguous()
        width = (s.num_heads + 2 * s.num_kv_heads) * s.head_dim
        buffers = [torch.empty(t, n, dtype=self.dtype) for n in (
            s.hidden, width, s.num_heads * s.head_dim, s.hidden, 2 * s.intermediate,
            s.intermediate, s.hidden)]
        step = _Step(t, residual.data_ptr(), *(b.data_ptr() for b in buffers),
                     positions.data_ptr(), slot_mapping.data_ptr(),
                     *(x.data_ptr() for x in (seqs, q_rows, lens, tables)), tables.stride(0),
                     len(seqs), omp_threads())
        failed = self._run(ctypes.addressof(self._decoder), ctypes.addressof(step))
        if failed > 0:
            bad = failed - 1
            raise IndexError(f"slot_mapping[{bad}] = {int(slot_mapping[bad])} is outside the "
                             f"cache's {self._decoder.num_slots} slots")
        if failed < 0:
            raise MemoryError("layer_loop: a kernel could not allocate its scratch memory")
        return buffers[-1]
