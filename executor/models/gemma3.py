"""Gemma 3 text (`Gemma3ForCausalLM`, model type gemma3_text): Gemma 2 (models/gemma2.py) with
q and k normalised per head (Gemma's 1 + w RMSNorm) before rotary, and a rotary table per layer
kind: sliding-window layers turn at their own base (rope_local_base_freq), global layers at
rope_theta with the model's scaling. The final logits are soft-capped where config.json says so
(not by default); attention scores never are: transformers' Gemma 3 keeps attn_logit_softcapping
but does not hand it to attention, and its outputs are the reference.
"""

from __future__ import annotations

import dataclasses
from types import ModuleType

from pagedserve.executor.layers.rotary import RotaryEmbedding, make_rotary
from pagedserve.executor.model_config import ModelConfig
from pagedserve.executor.models.gemma2 import Gemma2ForCausalLM


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    qk_norm = True

    def __init__(self, config: ModelConfig, backend: ModuleType):
        super().__init__(dataclasses.replace(config, attn_logit_softcapping=0.0), backend)

    @staticmethod
    def layer_rotaries(config: ModelConfig, backend: ModuleType) -> list[RotaryEmbedding]:
        """The local table for sliding-window layers, the global one for the others."""
        dim, positions = int(config.head_dim * config.partial_rotary_factor), \
            config.max_position_embeddings
        full = make_rotary(dim, positions, config.rope_theta, config.rope_scaling, backend)
        local = make_rotary(dim, positions, config.local_rope_theta or config.rope_theta,
                            config.local_rope_scaling, backend)
        return [local if kind == "sliding_attention" else full
                for kind in config.layer_types or ["full_attention"] * config.num_layers]
