"""When a Llama-family model's layers run as one C call (kernels/cpu/layer_loop.py) instead of
module by module, and the hand-over of its weights and KV pages to that loop.

The loop calls the same kernels in the same order, so it changes no bit of any result; it only
takes what it was written for: the CPU kernels, every projection quantized in the C GEMM's packed
form (a GGUF or a quantized checkpoint as the engine runs it by default), for a float32 model on
a CPU with AVX2 and no AVX-512 in panel_gemm's panels, or for a bf16 one where panel_gemm512 is
preferred (an Intel Xeon without AMX) in its paired panels; no tensor parallelism, no pipeline
stage short of the whole model (the loop ends in the final norm), no batch-invariant row
padding, plain RoPE, and a KV cache in the activations' dtype. Anything else keeps the module
path, and `reason` says why.
PAGEDSERVE_DISABLE_LAYER_LOOP=1 turns it off (benchmarks and tests compare the two paths).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from pagedserve.executor.attention_metadata import AttentionMetadata
from pagedserve.executor.kv_cache import KVCache
from pagedserve.executor.layers.attention import PagedAttention
from pagedserve.executor.layers.norm import RMSNorm
from pagedserve.executor.layers.rotary import RotaryEmbedding

ENV_DISABLE = "PAGEDSERVE_DISABLE_LAYER_LOOP"


def _linear(layer: nn.Module, name: str, dtype: torch.dtype):
    """(LoopLinear, "") or (None, why not) for one projection."""
    from pagedserve.kernels.cpu.layer_loop import LoopLinear, takes
    from pagedserve.kernels.cpu.quant_linear import PackedQuantWeight

    if getattr(layer, "tp_size", 1) != 1:
        return None, "tensor parallelism"
    if getattr(layer, "min_rows", 1) != 1:
        return None, "batch-invariant row padding"
    if layer.input_perm is not None:
        return None, f"{name} reorders its inputs (act-order)"
    packed = getattr(layer, "packed", None)
    if isinstance(layer.quant, PackedQuantWeight):
        loop_linear = LoopLinear(layer.quant, layer.bias, layer.quant.out_features)
    elif packed is not None and packed.panels is not None:
        loop_linear = LoopLinear(packed.panels, layer.bias, packed.out_features)
    elif packed is not None and packed.pairs is not None:
        loop_linear = LoopLinear(packed.pairs, layer.bias, packed.out_features)
    else:
        return None, f"{name} is neither a packed quantized weight nor in panels or pairs"
    why = takes(loop_linear, dtype)
    return (None, f"{name}: {why}") if why else (loop_linear, "")


def _layer(model: nn.Module, i: int, kv_cache: KVCache, dtype: torch.dtype):
    """(LoopLayer, "") or (None, why not) for decoder layer i."""
    from pagedserve.executor.models.llama import LlamaAttention, LlamaMLP
    from pagedserve.kernels.cpu.layer_loop import LoopLayer

    layer = model.model.layers[i]
    attn, mlp = layer.self_attn, layer.mlp
    if type(attn) is not LlamaAttention or type(mlp) is not LlamaMLP:
        return None, "a layer other than Llama's attention and SiLU MLP"
    if type(attn.rotary) is not RotaryEmbedding or type(attn.attn) is not PagedAttention:
        return None, "a rotary or attention variant"
    heads = (attn.q_norm, attn.k_norm) if attn.qk_norm else ()
    norms = (layer.input_layernorm, layer.post_attention_layernorm, *heads)
    if any(type(n) is not RMSNorm or n.weight.dtype != dtype for n in norms):
        return None, "a norm other than RMSNorm in the activations' dtype"
    k, v = kv_cache.k[i], kv_cache.v[i]
    if k.dtype != dtype or not (k.is_contiguous() and v.is_contiguous()):
        return None, f"a KV cache in {k.dtype} with activations in {dtype}"
    linears = []
    for name, lin in (("qkv_proj", attn.qkv_proj), ("o_proj", attn.o_proj),
                      ("gate_up_proj", mlp.gate_up_proj), ("down_proj", mlp.down_proj)):
        loop_linear, why = _linear(lin, name, dtype)
        if loop_linear is None:
            return None, why
        linears.append(loop_linear)
    pa = attn.attn
    return LoopLayer(*linears, norms[0].weight.detach(), norms[1].weight.detach(), k, v,
                     pa.scale, pa.softcap, pa.sliding_window, pa.k_scale, pa.v_scale,
                     *(n.weight.detach() for n in heads)), ""


def build_layer_loop(model: nn.Module, kv_cache: KVCache):
    """(LayerLoop, "") for a model that qualifies (see the module's docstring), else (None, why)."""
    if os.environ.get(ENV_DISABLE, "").strip() not in ("", "0"):
        return None, f"{ENV_DISABLE} is set"
    if getattr(model.backend, "__name__", "") != "pagedserve.kernels.cpu":
        return None, "not the CPU kernels"
    stage = getattr(model, "stage", None)
    if stage is not None and not stage.whole:
        return None, "pipeline parallelism (this stage holds only some of the layers)"
    from pagedserve.kernels.cpu.layer_loop import LayerLoop, LoopShape, unavailable

    config, dtype = model.config, model.model.norm.weight.dtype
    why = unavailable(dtype)
    if why or type(model.model.norm) is not RMSNorm:
        return None, why or "a final norm other than RMSNorm"
    layers = []
    for i in range(len(model.model.layers)):
        layer, why = _layer(model, i, kv_cache, dtype)
        if layer is None:
            return None, why
        layers.append(layer)
    attn = model.model.layers[0].self_attn
    shape = LoopShape(config.hidden_size, attn.qkv_proj.num_heads, attn.qkv_proj.num_kv_heads,
                      config.head_dim, config.intermediate_size, config.rms_norm_eps)
    rotary = attn.rotary.cos_sin_cache
    return LayerLoop(layers, model.model.norm.weight.detach(), rotary, shape, dtype), ""


class LayerLoopSlot:
    """A model's loop, built at the first step for a KV cache (again when the cache changes)."""

    def __init__(self) -> None:
        self._cache: KVCache | None = None
        self._loop = None
        self.reason = "not built yet"

    def run(self, model: nn.Module, hidden: torch.Tensor, positions: torch.Tensor,
            attn: AttentionMetadata, kv_cache: KVCache) -> torch.Tensor | None:
        """The final-norm hidden states, or None where the model's modules must run the step."""
        if self._cache is not kv_cache:
            self._cache = kv_cache
            self._loop, self.reason = build_layer_loop(model, kv_cache)
        if self._loop is None:
            return None
        return self._loop.run(hidden, positions, attn.slot_mapping, attn.cu_seqlens_q,
                              attn.seq_lens, attn.block_tables)
