"""The fallback: any transformers decoder whose attention goes through transformers'
AttentionInterface, run on pagedserve's paged KV cache and kernels.

    flat step [T] --(as one row: [1, T], position_ids [1, T])--> transformers' base model
        each attention layer calls `pagedserve_attention(module, q, k, v, ...)`:
            q/k/v [1, heads, T, head_dim] -> write K/V into this layer's pages -> paged attention
    final hidden [T, hidden] -> lm_head (+ the model's own logit scaling / soft-capping)

The whole step is one row to transformers: every op but attention works per token, and attention
sees sequence boundaries through pagedserve's AttentionMetadata, so no mask is built (an
implementation name transformers' mask interface does not know skips mask creation). The step's
metadata and cache reach the attention function through a thread-local set around the forward:
many models do not pass their forward's keyword arguments down to attention.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from pagedserve.executor.attention_metadata import AttentionMetadata
from pagedserve.executor.kv_cache import KVCache
from pagedserve.executor.model_config import ModelConfig
from pagedserve.kernels.backend import KernelBackend

ATTN_IMPLEMENTATION = "pagedserve"  # the name registered with transformers.AttentionInterface
LAYER_ATTR = "_pagedserve_kv_layer"  # set on each attention module: its KV cache layer


@dataclass
class _Step:
    attn: AttentionMetadata
    kv_cache: KVCache
    backend: KernelBackend


# Answers an attention call in place of the cache (the load check in transformers_probe.py):
# (module, q, k, v, mask, scale, the call's other keyword arguments) -> [1, T, Hq, D].
ProbeFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None",
                    float, dict], torch.Tensor]
_local = threading.local()  # .step: the running _Step; .probe: a ProbeFn


@contextmanager
def running_step(step: _Step | None = None, probe: ProbeFn | None = None) -> Iterator[None]:
    """Within: attention calls use `step` (a real step), or `probe` answers them."""
    _local.step, _local.probe = step, probe
    try:
        yield
    finally:
        _local.step = _local.probe = None


def layer_window(module: nn.Module, kwargs: dict) -> int:
    """The sliding window of this call: the model's keyword when it passes one (None: full
    attention), else the module's own attribute; 0 means none."""
    window = kwargs["sliding_window"] if "sliding_window" in kwargs else getattr(
        module, "sliding_window", None)
    return int(window or 0)


def layer_softcap(module: nn.Module, kwargs: dict) -> float:
    """Gemma 2-style attention-score soft-capping (0 = none), from the call or the module."""
    cap = kwargs.get("softcap")
    if cap is None:
        cap = getattr(module, "attn_logit_softcapping", None)
    return float(cap or 0.0)


def pagedserve_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                         value: torch.Tensor, attention_mask: torch.Tensor | None,
                         scaling: float | None = None, dropout: float = 0.0,
                         **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: q [1, Hq, T, D], k/v [1, Hkv, T, D] ->
    ([1, T, Hq, D], no weights). K/V go into the pages first: a prompt's queries reach the keys of
    their own step only through the cache."""
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    probe: ProbeFn | None = getattr(_local, "probe", None)
    if probe is not None:
        return probe(module, query, key, value, attention_mask, scale, kwargs), None
    step: _Step | None = getattr(_local, "step", None)
    if step is None:
        raise RuntimeError("pagedserve attention was called outside a pagedserve step")
    layer = getattr(module, LAYER_ATTR)
    # [T, heads, D], each token's heads one stretch (the kernels' fast paths want that layout;
    # transformers' q/k/v usually are views of it already, and then nothing is copied)
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))
    k_cache, v_cache, md = step.kv_cache.k[layer], step.kv_cache.v[layer], step.attn
    scales = {"k_scale": step.kv_cache.k_scale[layer], "v_scale": step.kv_cache.v_scale[layer]}
    step.backend.write_kv(k, v, k_cache, v_cache, md.slot_mapping, **scales)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    step.backend.paged_attention(
        q, k_cache, v_cache, md.cu_seqlens_q, md.seq_lens, md.block_tables, out, scale=scale,
        max_seqlen_q=md.max_seqlen_q, max_seqlen_k=md.max_seqlen_k,
        sliding_window=layer_window(module, kwargs), softcap=layer_softcap(module, kwargs),
        **scales)
    return out[None], None


def register_attention() -> None:
    """Make `attn_implementation="pagedserve"` known to transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, pagedserve_attention)


class TransformersForCausalLM(nn.Module):
    """A transformers causal LM behind the native models' interface (forward, compute_logits)."""

    def __init__(self, hf_model: nn.Module, backend: KernelBackend,
                 config: ModelConfig | None = None):
        super().__init__()
        self.hf, self.backend = hf_model, backend
        self.config = config  # the executor's view, made after the load probe

    @property
    def base(self) -> nn.Module:
        """The decoder stack without the LM head (`model`, `transformer`, `gpt_neox`, ...)."""
        return self.hf.base_model

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata,
                kv_cache: KVCache, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Flat tokens [T] (or their embeddings [T, hidden]) -> final-norm hidden [T, hidden]."""
        with running_step(_Step(attn, kv_cache, self.backend)):
            return self.run_base(input_ids, positions, inputs_embeds)

    def run_base(self, input_ids: torch.Tensor, positions: torch.Tensor,
                 inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """The base model on one row of flat tokens; attention goes wherever running_step says."""
        if inputs_embeds is not None:
            out = self.base(inputs_embeds=inputs_embeds[None], position_ids=positions[None],
                            use_cache=False)
        else:
            out = self.base(input_ids=input_ids[None], position_ids=positions[None],
                            use_cache=False)
        return out[0][0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] float32, with the post-processing the model's own
        ForCausalLM.forward applies after its LM head (the load probe checks that nothing else
        happens there)."""
        logits = self.hf.get_output_embeddings()(hidden)
        cfg = self.hf.config
        if getattr(cfg, "logits_scaling", None):  # Granite divides
            logits = logits / cfg.logits_scaling
        if getattr(self.hf, "logit_scale", None) is not None:  # Cohere multiplies
            logits = logits * self.hf.logit_scale
        cap = getattr(cfg, "final_logit_softcapping", None)
        if cap:  # Gemma 2 / 3
            logits = torch.tanh(logits / cap) * cap
        return logits.float()
