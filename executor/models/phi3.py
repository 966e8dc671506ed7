"""Phi-3 (`Phi3ForCausalLM`): the Llama decoder (models/llama.py) with the checkpoint's q/k/v and
gate/up already fused, LongRoPE scaling ("longrope", formerly "su") or plain RoPE over a part of
each head (partial_rotary_factor), and an optional sliding window on every layer.

The fused checkpoint tensors are cut into their q/k/v and gate/up parts on the way in, so each
part goes through our fused parameter's own shard loader (which also shards it for tensor
parallelism).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from types import ModuleType

import torch

from pagedserve.executor.attention_metadata import AttentionMetadata
from pagedserve.executor.kv_cache import KVCache
from pagedserve.executor.layers.quant_weights import split_rows
from pagedserve.executor.layers.rotary import make_rotary
from pagedserve.executor.model_config import ModelConfig
from pagedserve.executor.models.llama import LlamaFamilyForCausalLM
from pagedserve.executor.models.pipeline_stage import Carried
from pagedserve.kernels.quantized import QuantizedWeight


class Phi3ForCausalLM(LlamaFamilyForCausalLM):
    def __init__(self, config: ModelConfig, backend: ModuleType):
        # The Llama decoder is built on plain RoPE, then every layer gets Phi-3's own table.
        super().__init__(dataclasses.replace(config, rope_scaling=None), backend)
        self.config = config
        self.rotary = make_rotary(int(config.head_dim * config.partial_rotary_factor),
                                  config.max_position_embeddings, config.rope_theta,
                                  config.rope_scaling, backend)
        for i in self.stage.layers:  # this pipeline stage's layers (all, with one stage)
            self.model.layers[i].self_attn.rotary = self.rotary

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata,
                kv_cache: KVCache, inputs_embeds: torch.Tensor | None = None,
                carried: Carried | None = None) -> torch.Tensor | Carried:
        # positions reach only the rotary: LongRoPE reads them as rows of its two tables
        rows = self.rotary.table_rows(positions, attn)
        return super().forward(input_ids, rows, attn, kv_cache, inputs_embeds, carried)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(self._unfused(weights))

    def _unfused(self, weights: Iterable[tuple[str, torch.Tensor]]
                 ) -> Iterator[tuple[str, torch.Tensor]]:
        """qkv_proj -> q_proj, k_proj, v_proj; gate_up_proj -> gate_proj, up_proj (views)."""
        c = self.config
        q, kv, inter = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size
        fused = {".qkv_proj.": (("q_proj", "k_proj", "v_proj"), [q, kv, kv]),
                 ".gate_up_proj.": (("gate_proj", "up_proj"), [inter, inter])}
        for name, tensor in weights:
            part = next((p for p in fused if p in name), None)
            if part is None:
                yield name, tensor
                continue
            names, sizes = fused[part]
            if tensor.shape[0] != sum(sizes):
                raise ValueError(f"tensor {name!r}: expected {sum(sizes)} rows "
                                 f"({' + '.join(map(str, sizes))}), got {tuple(tensor.shape)}")
            chunks = (split_rows(tensor, sizes) if isinstance(tensor, QuantizedWeight)
                      else tensor.split(sizes))
            for ours, chunk in zip(names, chunks):
                yield name.replace(part, f".{ours}."), chunk
