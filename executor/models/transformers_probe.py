"""The load-time check of a transformers model under the fallback: one short forward in which the
attention function records every call instead of touching a cache.

It proves what reading the config cannot: that every layer's attention goes through the
interface, once, causally, with no mask or bias the paged kernels would drop; that all layers
share one K/V shape (the cache holds one); and that the LM head plus the known post-processing
(TransformersForCausalLM.compute_logits) gives the model's own logits. It also numbers the
attention modules: the order of their calls is their KV cache layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from pagedserve.executor.models.transformers_backend import (
    LAYER_ATTR,
    TransformersForCausalLM,
    layer_softcap,
    layer_window,
    running_step,
)

PROBE_TOKENS = 6
# Keyword arguments (or module attributes) of attention that the paged kernels cannot honour.
UNSUPPORTED_KWARGS = {"s_aux": "attention sinks", "sinks": "attention sinks",
                      "position_bias": "a position bias"}


class UnsupportedModel(ValueError):
    """The architecture cannot run under pagedserve; the message names it and says why."""


@dataclass(frozen=True)
class Call:
    module: nn.Module
    q: tuple[int, ...]
    k: tuple[int, ...]
    v: tuple[int, ...]
    has_mask: bool
    extra: tuple[str, ...]  # keyword arguments paged attention cannot honour


@dataclass(frozen=True)
class AttentionShape:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


def probe_attention(calls: list[Call], module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                    value: torch.Tensor, mask: torch.Tensor | None, scale: float,
                    kwargs: dict) -> torch.Tensor:
    """Record the call; answer with plain causal attention, so the layers after it see values
    shaped like real ones. -> [1, T, Hq, D]."""
    extra = tuple(sorted({why for key, why in UNSUPPORTED_KWARGS.items()
                          if kwargs.get(key) is not None or getattr(module, key, None) is not None}))
    calls.append(Call(module, tuple(query.shape), tuple(key.shape), tuple(value.shape),
                      mask is not None, extra))
    hq, hkv = query.shape[1], key.shape[1]
    if query.shape[-1] != key.shape[-1] or hq % hkv or query.shape[2] != key.shape[2]:
        return query.new_zeros(query.shape[0], query.shape[2], hq, value.shape[-1])
    k = key.float().repeat_interleave(hq // hkv, 1)
    v = value.float().repeat_interleave(hq // hkv, 1)
    scores = query.float() @ k.transpose(2, 3) * scale
    cap = layer_softcap(module, kwargs)
    if cap:
        scores = torch.tanh(scores / cap) * cap
    pos = torch.arange(query.shape[2], device=query.device)
    allowed = pos[None, :] <= pos[:, None]
    window = layer_window(module, kwargs)
    if window:
        allowed &= pos[None, :] > pos[:, None] - window
    out = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ v
    return out.to(query.dtype).transpose(1, 2)


def probe_inputs(model: TransformersForCausalLM) -> tuple[torch.Tensor, torch.Tensor]:
    """The probe's token ids and positions: one short sequence."""
    vocab = model.hf.get_output_embeddings().weight.shape[0]
    device = model.hf.get_input_embeddings().weight.device  # the head's may be a packed shape
    positions = torch.arange(PROBE_TOKENS, device=device)
    return (positions * 7 + 3) % vocab, positions


def probe_hidden(model: TransformersForCausalLM) -> torch.Tensor:
    """The base model's output on the probe's tokens, attention answered by probe_attention."""
    with torch.inference_mode(), running_step(probe=partial(probe_attention, [])):
        return model.run_base(*probe_inputs(model))


def probe_model(model: TransformersForCausalLM, arch: str) -> AttentionShape:
    """Run the check; number the attention modules; the K/V shape the cache needs."""
    hf = model.hf
    if not isinstance(getattr(hf.get_output_embeddings(), "weight", None), torch.Tensor):
        raise UnsupportedModel(f"{arch}: it has no LM head module (get_output_embeddings())")
    ids, positions = probe_inputs(model)
    base_calls: list[Call] = []
    full_calls: list[Call] = []
    try:
        with torch.inference_mode():
            with running_step(probe=partial(probe_attention, base_calls)):
                hidden = model.run_base(ids, positions)
            with running_step(probe=partial(probe_attention, full_calls)):
                full = hf(input_ids=ids[None], position_ids=positions[None], use_cache=False)
            ours, theirs = model.compute_logits(hidden), full.logits[0].float()
    except Exception as e:  # any failure here means the model does not run this way
        raise UnsupportedModel(f"{arch}: its forward fails under pagedserve attention "
                               f"({type(e).__name__}: {e})") from None
    shape = _check_calls(base_calls, full_calls, hf, arch)
    for i, call in enumerate(base_calls):
        setattr(call.module, LAYER_ATTR, i)
    _check_positions(model, ids, positions, hidden, arch)
    if ours.shape != theirs.shape or not torch.allclose(ours, theirs, rtol=1e-4, atol=1e-4):
        raise UnsupportedModel(f"{arch}: its ForCausalLM forward changes the logits after the LM "
                               "head in a way pagedserve does not reproduce")
    return shape


def _check_calls(base: list[Call], full: list[Call], hf: nn.Module, arch: str) -> AttentionShape:
    """The refusals, most basic first; each names the architecture and the reason."""
    def refuse(why: str) -> UnsupportedModel:
        return UnsupportedModel(f"{arch}: {why}")

    if not base:
        raise refuse("no layer calls transformers' attention interface (state-space, recurrent "
                     "or custom attention layers)")
    modules = [c.module for c in base]
    if len({id(m) for m in modules}) != len(modules) or [c.module for c in full] != modules:
        raise refuse("an attention module runs more than once per forward (shared layers)")
    layers = getattr(hf.config, "num_hidden_layers", None)
    if isinstance(layers, int) and len(base) < layers:
        raise refuse(f"only {len(base)} of its {layers} layers route attention through the "
                     "interface (state-space or custom layers)")
    for c in base:
        if len(c.q) != 4 or c.q[0] != 1 or c.q[2] != PROBE_TOKENS or c.k[2] != PROBE_TOKENS:
            raise refuse(f"attention tensors are not [batch, heads, tokens, head size] (q {c.q})")
        if c.has_mask:
            raise refuse("its attention takes a mask or bias (e.g. ALiBi) that paged attention "
                         "cannot apply")
        if c.extra:
            raise refuse(f"its attention uses {', '.join(c.extra)}, which the paged kernels lack")
        if getattr(c.module, "is_causal", True) is False:
            raise refuse("its attention is bidirectional (an encoder); pagedserve serves causal "
                         "decoders")
        if not c.q[3] == c.k[3] == c.v[3] or c.q[1] % c.k[1]:
            raise refuse(f"query, key and value have {c.q[1]}x{c.q[3]}, {c.k[1]}x{c.k[3]} and "
                         f"{c.v[1]}x{c.v[3]} (heads x head size): not grouped-query attention "
                         "with one head size (as in multi-head latent attention)")
    if len({(c.q[1], c.k[1], c.k[3]) for c in base}) > 1:
        raise refuse("its layers differ in head counts or head size; the paged cache holds one "
                     "shape for every layer")
    c = base[0]
    return AttentionShape(len(base), c.q[1], c.k[1], c.k[3])


def _check_positions(model: TransformersForCausalLM, ids: torch.Tensor, positions: torch.Tensor,
                     hidden: torch.Tensor, arch: str) -> None:
    """The model must place tokens by the position ids it is given: a step holds many sequences
    and positions restart for each. Moving only the last token's position must change its
    output (shifting all positions would not show it: rotary attention is shift-invariant)."""
    moved = positions.clone()
    moved[-1] += 5
    with torch.inference_mode(), running_step(probe=partial(probe_attention, [])):
        other = model.run_base(ids, moved)
    if torch.allclose(other[-1].float(), hidden[-1].float(), rtol=1e-5, atol=1e-6):
        raise UnsupportedModel(f"{arch}: its output does not depend on the position ids it is "
                               "given (it numbers tokens itself), so packed sequences would get "
                               "wrong positions")
