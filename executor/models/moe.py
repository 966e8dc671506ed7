"""Mixture-of-experts decoders: Mixtral and Qwen3-MoE. The Llama family's decoder (models/llama.py)
with a sparse MLP on the layers ModelConfig.moe_layers marks:

    hidden -> gate (router logits [T, E]) -> top-k experts per token -> fused experts -> hidden

Attention is the family's: Mixtral's as Mistral's (optional sliding window), Qwen3-MoE's as
Qwen3's (per-head q/k RMSNorm, explicit head_dim, q/k/v/o biases with attention_bias); a Qwen3-MoE
layer without experts (mlp_only_layers, decoder_sparse_step) has the family's dense MLP. Where
the two routers differ (renormalising, the routing weights' dtype), ModelConfig says.

Checkpoint names, per expert e, go into the stacked expert weights of layers/fused_moe.py:

    Mixtral    block_sparse_moe.experts.{e}.w1 / w3 / w2      -> mlp.experts.w13 (e, 0) / (e, 1), w2 e
    Qwen3-MoE  mlp.experts.{e}.gate_proj / up_proj / down_proj -> likewise
               block_sparse_moe.gate, mlp.gate               -> mlp.gate
"""

from __future__ import annotations

import re
from types import ModuleType

import torch
from torch import nn

from pagedserve.executor.layers.fused_moe import FusedMoE, route
from pagedserve.executor.layers.linear import ReplicatedLinear
from pagedserve.executor.model_config import ModelConfig
from pagedserve.executor.models.llama import LlamaFamilyForCausalLM, dense_mlp

# Checkpoint expert projection -> (our stacked parameter, its half of w13 or None for w2).
EXPERT_PROJECTIONS = {
    "w1": ("w13_weight", 0), "w3": ("w13_weight", 1), "w2": ("w2_weight", None),  # Mixtral
    "gate_proj": ("w13_weight", 0), "up_proj": ("w13_weight", 1),  # Qwen3-MoE
    "down_proj": ("w2_weight", None),
}
_EXPERT = re.compile(r"^(.*\.)(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(\w+)\.weight$")


class SparseMoeBlock(nn.Module):
    """Router plus experts; [T, hidden] -> [T, hidden]."""

    def __init__(self, config: ModelConfig, backend: ModuleType):
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"hidden_act: {config.hidden_act!r} is not supported (only 'silu')")
        if not 0 < config.num_experts_per_tok <= config.num_experts:
            raise ValueError(f"num_experts_per_tok: {config.num_experts_per_tok} is not in "
                             f"1..num_experts ({config.num_experts})")
        self.top_k = config.num_experts_per_tok
        self.renormalize = config.norm_topk_prob
        self.round_weights = config.round_router_weights
        self.gate = ReplicatedLinear(config.hidden_size, config.num_experts, bias=False)
        self.experts = FusedMoE(config.num_experts, config.hidden_size,
                                config.moe_intermediate_size, backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.gate(x)
        weights, ids = route(logits, self.top_k, self.renormalize,
                             logits.dtype if self.round_weights else torch.float32)
        return self.experts(x, weights, ids)


def sparse_or_dense_mlp(config: ModelConfig, layer: int, backend: ModuleType) -> nn.Module:
    if config.moe_layers[layer]:
        return SparseMoeBlock(config, backend)
    return dense_mlp(config, layer, backend)


class MoEForCausalLM(LlamaFamilyForCausalLM):
    """MixtralForCausalLM and Qwen3MoeForCausalLM."""

    make_mlp = staticmethod(sparse_or_dense_mlp)
    tensor_parallel = False  # the experts are not sharded: tensor_parallel_size 1 only

    def param_name(self, checkpoint_name: str) -> tuple[str, object]:
        match = _EXPERT.match(checkpoint_name)
        if match and match[3] in EXPERT_PROJECTIONS:
            prefix, expert, (ours, half) = match[1], int(match[2]), EXPERT_PROJECTIONS[match[3]]
            return f"{prefix}mlp.experts.{ours}", expert if half is None else (expert, half)
        return super().param_name(checkpoint_name.replace(".block_sparse_moe.", ".mlp."))

    def checkpoint_name(self, param_name: str, shard_id: object) -> str:
        mixtral = self.config.architecture == "MixtralForCausalLM"
        if ".experts." not in param_name:
            name = super().checkpoint_name(param_name, shard_id)
            return name.replace(".mlp.gate.", ".block_sparse_moe.gate.") if mixtral else name
        names = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
        expert, half = shard_id if isinstance(shard_id, tuple) else (shard_id, 2)
        block = "block_sparse_moe" if mixtral else "mlp"
        prefix = param_name.split(".mlp.experts.")[0]
        return f"{prefix}.{block}.experts.{expert}.{names[half]}.weight"
