r"""Quantized weights (kernels/quantized.py's QuantizedWeight) inside the layer family.

A checkpoint reader may yield a QuantizedWeight instead of a dense tensor for a linear layer's
`.weight` (and for the embedding / LM head), under the same HF names. The layer's loader slices it
for tensor parallelism as it would the dense tensor (rows; a row-parallel layer's input columns only
at group boundaries) and keeps the parts until every shard has arrived. `finish_quantized` then
runs once after load_weights: each layer joins its parts, packs them with the kernel backend's
`pack_quantized`, and its dense weight becomes a shape (cpu_gemm.shape_only): one copy, packed.

    q_proj (QW) --\                                     (parts joined in shard order, as dense rows)
    k_proj (QW) ---+-> qkv_proj.quant_parts {q, k, v} --finish--> backend.pack_quantized -> .quant
    v_proj (QW) --/
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from pagedserve.kernels.quantized import QuantizedWeight


@dataclass(frozen=True)
class ActOrderWeight(QuantizedWeight):
    """A GPTQ act-order (desc_act) weight with its input columns reordered so that each group's
    inputs are consecutive: column k of q is the checkpoint's input input_perm[k]. The layer
    gathers x's columns the same way before the multiply (x[:, input_perm] @ q.T)."""

    input_perm: torch.Tensor | None = None  # [in] int64


def input_perm(qw: QuantizedWeight) -> torch.Tensor | None:
    return getattr(qw, "input_perm", None)


def check_same_perm(layer: str, held: torch.Tensor | None, qw: QuantizedWeight) -> None:
    """The shards of one layer share its input, so they must share its input order."""
    perm = input_perm(qw)
    if (held is None) != (perm is None) or (perm is not None and not torch.equal(held, perm)):
        raise ValueError(f"{layer}: its shards' act-order input orders (g_idx) differ; they "
                         "share one input and must be reordered alike")


def _narrow(t: torch.Tensor | None, dim: int, start: int, length: int) -> torch.Tensor | None:
    return None if t is None else t.narrow(dim, start, length)


def narrow_rows(qw: QuantizedWeight, start: int, length: int) -> QuantizedWeight:
    """Output rows start..start+length of a quantized weight (views)."""
    return replace(qw, q=qw.q.narrow(0, start, length), scale=qw.scale.narrow(0, start, length),
                   offset=_narrow(qw.offset, 0, start, length))


def narrow_inputs(qw: QuantizedWeight, start: int, length: int) -> QuantizedWeight:
    """Input columns start..start+length; both must fall on group boundaries (a group's scale
    cannot be split between ranks)."""
    if start % qw.group or length % qw.group:
        raise ValueError(f"the tensor-parallel input slice {start}..{start + length} does not fall "
                         f"on the quantization group boundaries (group {qw.group})")
    g0, gn = start // qw.group, length // qw.group
    return replace(qw, q=qw.q.narrow(1, start, length), scale=qw.scale.narrow(1, g0, gn),
                   offset=_narrow(qw.offset, 1, g0, gn))


def owned(qw: QuantizedWeight) -> QuantizedWeight:
    """A slice copied out of the whole checkpoint tensor, so that the whole can be freed (a rank
    keeps only its part until finish_quantized)."""
    return replace(qw, q=qw.q.clone(), scale=qw.scale.clone(),
                   offset=None if qw.offset is None else qw.offset.clone())


def split_rows(qw: QuantizedWeight, sizes: list[int]) -> list[QuantizedWeight]:
    """A quantized weight cut into consecutive row blocks (a fused checkpoint tensor's parts)."""
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [narrow_rows(qw, s, n) for s, n in zip(starts, sizes)]


def cat_rows(parts: list[QuantizedWeight], zero_rows: int = 0) -> QuantizedWeight:
    """Parts stacked by rows (plus zero_rows rows of code 0, scale 0: zero weights). The parts
    share bits and group (checked as they load); an offset missing on some parts is 0 there."""
    first = parts[0]
    if zero_rows:
        groups = first.scale.shape[1]
        parts = [*parts, QuantizedWeight(first.q.new_zeros(zero_rows, first.q.shape[1]),
                                         first.scale.new_zeros(zero_rows, groups), None,
                                         first.group, first.bits)]
    offset = None
    if any(p.offset is not None for p in parts):
        offset = torch.cat([torch.zeros_like(p.scale) if p.offset is None else p.offset
                            for p in parts])
    return QuantizedWeight(torch.cat([p.q for p in parts]).contiguous(),
                           torch.cat([p.scale for p in parts]).contiguous(),
                           None if offset is None else offset.contiguous(), first.group,
                           first.bits)


def check_compatible(parts: dict, shard_id: object, qw: QuantizedWeight) -> None:
    """All shards of one layer share bits and group: they become one packed weight."""
    for other_id, other in parts.items():
        if (other.bits, other.group) != (qw.bits, qw.group):
            raise ValueError(f"shard {shard_id!r} is quantized with {qw.bits} bits, group "
                             f"{qw.group}, but shard {other_id!r} of the same layer with "
                             f"{other.bits} bits, group {other.group}: one layer packs once")


def check_not_mixed(layer: str, dense: set, quantized: dict) -> None:
    """A layer is quantized whole or not at all."""
    if dense and quantized:
        raise ValueError(f"{layer} is half quantized: shards {sorted(map(str, dense))} are dense "
                         f"and {sorted(map(str, quantized))} quantized")


def release_storage(param: torch.Tensor) -> None:
    """Free a dense weight that quantized shards will replace, as soon as the first arrives: the
    model was built with dense storage for every weight, and holding it until finish_quantized
    would need the dense model's memory (on the CPU untouched pages cost nothing, on CUDA they
    do). The tensor keeps its shape; finish_quantized turns it into a shape_only parameter."""
    param.data.untyped_storage().resize_(0)


def finish_quantized(model: nn.Module, backend) -> int:
    """After load_weights: every module holding quantized parts packs them for `backend`; returns
    how many did. The parts a tied embedding kept for its LM head are dropped afterwards."""
    count = sum(bool(m.finish_quantized(backend)) for m in model.modules()
                if hasattr(m, "finish_quantized"))
    for p in model.parameters():
        if hasattr(p, "quantized"):
            del p.quantized
    return count
