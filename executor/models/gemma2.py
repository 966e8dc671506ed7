"""Gemma 2: the Llama decoder with four norms per layer and a few scalings.

    ids -> embed * sqrt(hidden) -> N x [norm -> attention -> norm -> +residual
                                        -> norm -> MLP -> norm -> +residual] -> norm -> logits
    attention: scale query_pre_attn_scalar ** -0.5, scores soft-capped (cap * tanh(s / cap)),
               sliding-window and global layers alternating (config.layer_types)
    MLP: down(gelu_tanh(gate(x)) * up(x)); logits soft-capped like the scores

Gemma's RMSNorm scales by (1 + w) in float32 (GemmaRMSNorm below stores 1 + w). The residual
adds are fused into the norm after each of them, as in llama.py: the post-attention norm's output
is added by the pre-feedforward norm, the post-feedforward norm's by the next layer's input norm.
Weight names and the fused q/k/v and gate/up loading are LlamaFamilyForCausalLM's, reused.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import nn

from pagedserve.executor.attention_metadata import AttentionMetadata
from pagedserve.executor.kv_cache import KVCache
from pagedserve.executor.layers.attention import PagedAttention
from pagedserve.executor.layers.embedding import VocabParallelEmbedding
from pagedserve.executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    copy_shard,
)
from pagedserve.executor.layers.norm import RMSNorm
from pagedserve.executor.layers.rotary import RotaryEmbedding, make_rotary
from pagedserve.executor.model_config import ModelConfig
from pagedserve.executor.models.llama import LlamaFamilyForCausalLM, tied_lm_head
from pagedserve.executor.models.pipeline_stage import (
    Carried,
    StageLayers,
    decoder_layers,
    run_layers,
)

GELU_TANH = ("gelu_pytorch_tanh",)


class GemmaRMSNorm(RMSNorm):
    """x / rms(x) * (1 + w): the checkpoint's w is stored as 1 + w, computed in float32 as
    transformers does. In float32 the result is then bitwise transformers'; in bf16 the
    normalised row and 1 + w are each rounded to bf16 before the product (transformers
    multiplies in float32 and rounds once), a difference of about one bf16 step."""

    def __init__(self, hidden_size: int, eps: float, backend: ModuleType):
        super().__init__(hidden_size, eps, backend)
        self.weight.weight_loader = _load_one_plus


def _load_one_plus(param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
    copy_shard(param.data, 1.0 + loaded.float(), None, 0, 1)


class GemmaAttention(nn.Module):
    """qkv_proj -> (Gemma 3: q/k GemmaRMSNorm per head) -> rotary -> paged attention -> o_proj."""

    def __init__(self, config: ModelConfig, layer: int, rotary: RotaryEmbedding,
                 backend: ModuleType, qk_norm: bool = False):
        super().__init__()
        d = config.head_dim
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, d, config.num_heads, config.num_kv_heads, bias=config.attention_bias
        )
        self.o_proj = RowParallelLinear(config.num_heads * d, config.hidden_size,
                                        bias=config.attention_bias)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = GemmaRMSNorm(d, config.rms_norm_eps, backend)
            self.k_norm = GemmaRMSNorm(d, config.rms_norm_eps, backend)
        self.rotary = rotary
        self.attn = PagedAttention(
            self.qkv_proj.num_heads, d, config.query_pre_attn_scalar**-0.5,
            config.layer_sliding_window(layer), backend, softcap=config.attn_logit_softcapping,
        )

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, attn: AttentionMetadata,
                k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj.split(self.qkv_proj(hidden))
        if self.qk_norm:  # per head, before rotary
            q, k = self.q_norm(q), self.k_norm(k)
        self.rotary(positions, q, k)  # in place
        return self.o_proj(self.attn(q, k, v, k_cache, v_cache, attn))


class GemmaMLP(nn.Module):
    """down(gelu_tanh(gate(x)) * up(x)), with gate and up in one GEMM."""

    def __init__(self, config: ModelConfig, backend: ModuleType):
        super().__init__()
        if config.hidden_act not in GELU_TANH:
            raise ValueError(f"hidden_activation: {config.hidden_act!r} is not supported "
                             f"(only {', '.join(GELU_TANH)})")
        size = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [size, size], bias=False)
        self.down_proj = RowParallelLinear(size, config.hidden_size, bias=False)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.backend.gelu_tanh_and_mul(self.gate_up_proj(x)))


class GemmaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, rotary: RotaryEmbedding,
                 backend: ModuleType, qk_norm: bool = False):
        super().__init__()

        def norm() -> GemmaRMSNorm:
            return GemmaRMSNorm(config.hidden_size, config.rms_norm_eps, backend)

        self.input_layernorm, self.post_attention_layernorm = norm(), norm()
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(), norm()
        self.self_attn = GemmaAttention(config, layer, rotary, backend, qk_norm)
        self.mlp = GemmaMLP(config, backend)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                residual: torch.Tensor | None, attn: AttentionMetadata, k_cache: torch.Tensor,
                v_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (this layer's post-feedforward-normed MLP output, residual stream before it)."""
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.post_attention_layernorm(
            self.self_attn(positions, hidden, attn, k_cache, v_cache))
        hidden, residual = self.pre_feedforward_layernorm(hidden, residual)
        return self.post_feedforward_layernorm(self.mlp(hidden)), residual


class GemmaModel(nn.Module):
    def __init__(self, config: ModelConfig, backend: ModuleType,
                 rotaries: list[RotaryEmbedding], qk_norm: bool = False):
        """rotaries[i]: layer i's rotary module (shared between layers of the same kind)."""
        super().__init__()
        self.stage = stage = StageLayers.current(config.num_layers)  # models/pipeline_stage.py
        self.embed_tokens = (VocabParallelEmbedding(config.vocab_size, config.hidden_size)
                             if stage.holds_embedding(config.tie_word_embeddings) else None)
        # each distinct table once, of the stage's layers
        self.rotaries = nn.ModuleList(dict.fromkeys(rotaries[i] for i in stage.layers))
        self.layers = decoder_layers(
            stage, lambda i: GemmaDecoderLayer(config, i, rotaries[i], backend, qk_norm))
        self.norm = (GemmaRMSNorm(config.hidden_size, config.rms_norm_eps, backend)
                     if stage.last else None)


class Gemma2ForCausalLM(LlamaFamilyForCausalLM):
    """Gemma 2; Gemma 3 text (models/gemma3.py) changes the rotary tables and adds q/k norms."""

    qk_norm = False

    def __init__(self, config: ModelConfig, backend: ModuleType):
        nn.Module.__init__(self)  # LlamaFamilyForCausalLM's weight loading, not its decoder
        self.config, self.backend = config, backend
        self.model = GemmaModel(config, backend, self.layer_rotaries(config, backend),
                                self.qk_norm)
        self.stage = self.model.stage
        self.lm_head = tied_lm_head(config, self.model) if self.stage.last else None

    @staticmethod
    def layer_rotaries(config: ModelConfig, backend: ModuleType) -> list[RotaryEmbedding]:
        """One table for every layer."""
        rotary = make_rotary(int(config.head_dim * config.partial_rotary_factor),
                             config.max_position_embeddings, config.rope_theta,
                             config.rope_scaling, backend)
        return [rotary] * config.num_layers

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata,
                kv_cache: KVCache, inputs_embeds: torch.Tensor | None = None,
                carried: Carried | None = None) -> torch.Tensor | Carried:
        """Flat tokens [T] (or their embeddings [T, hidden], taken as they are) -> final-norm
        hidden [T, hidden]; a pipeline stage's part of it as in LlamaFamilyForCausalLM."""
        residual = None
        if carried is not None:
            hidden, residual = carried.hidden, carried.residual
        elif inputs_embeds is None:
            hidden = self.model.embed_tokens(input_ids)
            # sqrt(hidden) rounded to the model's dtype first, as transformers scales
            hidden *= torch.tensor(self.config.hidden_size**0.5).to(hidden.dtype)
        else:  # copied: the residual stream is updated in place, and the caller's tensor is theirs
            hidden = inputs_embeds.clone()
        rows = {r: r.table_rows(positions, attn) for r in self.model.rotaries}
        return run_layers(self.stage, self.model.layers, self.model.norm, hidden, residual, attn,
                          kv_cache, lambda layer: rows[layer.self_attn.rotary])

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] float32, soft-capped in the model's dtype as transformers
        does."""
        logits = self.lm_head(hidden)
        cap = self.config.final_logit_softcapping
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits.float()
