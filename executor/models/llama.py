"""The Llama family in one decoder: Llama (incl. Llama-3 rope scaling), Mistral (sliding window),
Qwen2 (q/k/v bias) and Qwen3 (per-head q/k RMSNorm, explicit head_dim). ModelConfig fields, not
subclasses, switch the differences.

    ids -> embed -> N x [norm -> attention -> +residual -> norm -> MLP -> +residual] -> norm
    attention: qkv_proj -> split -> (q/k norm) -> rotary -> write K/V -> paged attention -> o_proj

Tokens are flat: all sequences of a step share every GEMM; only attention looks at sequence
boundaries, through AttentionMetadata. The residual stream is carried beside the hidden state so
each residual add is fused into the RMSNorm that follows it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from types import ModuleType

import torch
from torch import nn

from pagedserve.executor.attention_metadata import AttentionMetadata
from pagedserve.executor.kv_cache import KVCache
from pagedserve.executor.kv_scales import is_kv_scale
from pagedserve.executor.layers.attention import PagedAttention
from pagedserve.executor.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from pagedserve.executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from pagedserve.executor.layers.norm import RMSNorm
from pagedserve.executor.layers.rotary import RotaryEmbedding
from pagedserve.executor.model_config import ModelConfig
from pagedserve.executor.models.layer_loop import LayerLoopSlot
from pagedserve.executor.models.pipeline_stage import (
    Carried,
    StageLayers,
    decoder_layers,
    run_layers,
)
from pagedserve.kernels.quantized import QuantizedWeight

# Checkpoint projections that live inside one fused parameter: (checkpoint part, our part, shard).
STACKED_PARAMS = (
    (".q_proj.", ".qkv_proj.", "q"),
    (".k_proj.", ".qkv_proj.", "k"),
    (".v_proj.", ".qkv_proj.", "v"),
    (".gate_proj.", ".gate_up_proj.", 0),
    (".up_proj.", ".gate_up_proj.", 1),
)


class LlamaAttention(nn.Module):
    def __init__(
        self, config: ModelConfig, layer: int, rotary: RotaryEmbedding, backend: ModuleType
    ):
        super().__init__()
        d = config.head_dim
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, d, config.num_heads, config.num_kv_heads, bias=config.attention_bias
        )
        self.o_proj = RowParallelLinear(
            config.num_heads * d, config.hidden_size, bias=config.o_proj_bias
        )
        self.qk_norm = config.qk_norm
        if self.qk_norm:
            self.q_norm = RMSNorm(d, config.rms_norm_eps, backend)
            self.k_norm = RMSNorm(d, config.rms_norm_eps, backend)
        self.rotary = rotary
        self.attn = PagedAttention(
            self.qkv_proj.num_heads, d, d**-0.5, config.layer_sliding_window(layer), backend
        )

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        attn: AttentionMetadata,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> torch.Tensor:
        q, k, v = self.qkv_proj.split(self.qkv_proj(hidden))
        if self.qk_norm:  # Qwen3 normalises each head before rotary
            q, k = self.q_norm(q), self.k_norm(k)
        self.rotary(positions, q, k)  # in place
        return self.o_proj(self.attn(q, k, v, k_cache, v_cache, attn))


class LlamaMLP(nn.Module):
    """down(silu(gate(x)) * up(x)), with gate and up in one GEMM."""

    def __init__(self, config: ModelConfig, backend: ModuleType):
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"hidden_act: {config.hidden_act!r} is not supported (only 'silu')")
        size = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [size, size], bias=config.mlp_bias
        )
        self.down_proj = RowParallelLinear(size, config.hidden_size, bias=config.mlp_bias)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.backend.silu_and_mul(self.gate_up_proj(x)))


# Builds one layer's MLP: (config, layer index, backend) -> module of [T, hidden] -> [T, hidden].
MLPFactory = Callable[[ModelConfig, int, ModuleType], nn.Module]


def dense_mlp(config: ModelConfig, layer: int, backend: ModuleType) -> nn.Module:
    return LlamaMLP(config, backend)


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self, config: ModelConfig, layer: int, rotary: RotaryEmbedding, backend: ModuleType,
        make_mlp: MLPFactory = dense_mlp,
    ):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, backend)
        self.self_attn = LlamaAttention(config, layer, rotary, backend)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, backend)
        self.mlp = make_mlp(config, layer, backend)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        attn: AttentionMetadata,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ):
        """-> (this layer's MLP output, residual stream before adding it)."""
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, attn, k_cache, v_cache)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, backend: ModuleType, make_mlp: MLPFactory = dense_mlp):
        super().__init__()
        # this process's pipeline stage: its layers, the embedding and final norm where needed
        self.stage = stage = StageLayers.current(config.num_layers)
        self.embed_tokens = (VocabParallelEmbedding(config.vocab_size, config.hidden_size)
                             if stage.holds_embedding(config.tie_word_embeddings) else None)
        # One cos/sin table shared by every layer.
        rotary = RotaryEmbedding(
            config.head_dim,
            config.max_position_embeddings,
            config.rope_theta,
            config.rope_scaling,
            backend,
        )
        self.layers = decoder_layers(
            stage, lambda i: LlamaDecoderLayer(config, i, rotary, backend, make_mlp))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, backend) if stage.last else None


class LlamaFamilyForCausalLM(nn.Module):
    make_mlp: MLPFactory = staticmethod(dense_mlp)  # a subclass's hook: models/moe.py
    tensor_parallel = True  # every layer shards (executor/tensor_parallel.py)

    def __init__(self, config: ModelConfig, backend: ModuleType):
        super().__init__()
        self.config = config
        self.backend = backend  # the kernels every layer calls (a KernelBackend)
        self.model = LlamaModel(config, backend, self.make_mlp)
        self.stage = self.model.stage
        self.lm_head = tied_lm_head(config, self.model) if self.stage.last else None
        self.layer_loop = LayerLoopSlot()  # every layer in one C call, where the model qualifies

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionMetadata,
        kv_cache: KVCache,
        inputs_embeds: torch.Tensor | None = None,
        carried: Carried | None = None,
    ) -> torch.Tensor | Carried:
        """Flat tokens [T] (or their embeddings [T, hidden]) -> final-norm hidden [T, hidden].
        A pipeline stage after the first starts from the previous one's `carried` instead; one
        before the last returns what the next takes (models/pipeline_stage.py)."""
        residual = None
        if carried is not None:
            hidden, residual = carried.hidden, carried.residual
        elif inputs_embeds is None:
            hidden = self.model.embed_tokens(input_ids)
            looped = self.layer_loop.run(self, hidden, positions, attn, kv_cache)
            if looped is not None:
                return looped
        else:  # copied: the residual stream is updated in place, and the caller's tensor is theirs
            hidden = inputs_embeds.clone()
        return run_layers(self.stage, self.model.layers, self.model.norm, hidden, residual, attn,
                          kv_cache, lambda layer: positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] (only the rows that sample) -> [N, vocab] float32."""
        return self.lm_head(hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor | QuantizedWeight]]) -> None:
        """Fill every parameter from HF-named checkpoint tensors (a QuantizedWeight for a linear
        layer's, the embedding's or the LM head's weight: layers/quant_weights.py); raise ValueError
        naming the tensor on an unknown name or a wrong shape, and naming all missing ones at the
        end."""
        params = dict(self.named_parameters())  # a tied lm_head appears once, as the embedding
        loaded: set[tuple[str, object]] = set()
        tied = self.config.tie_word_embeddings
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name or is_kv_scale(name) or (
                name == "lm_head.weight" and tied
            ) or not self.stage.holds(name, tied):
                continue  # derived from the config, the same tensor as the embedding, an fp8
                # KV-cache scale (the executor reads those: executor/kv_scales.py), or a weight
                # of another pipeline stage
            param_name, shard_id = self.param_name(name)
            param = params.get(param_name)
            if param is None:
                raise ValueError(
                    f"unexpected tensor {name!r}: {self.config.architecture} has no such weight"
                )
            if isinstance(tensor, QuantizedWeight) and not getattr(param, "quantizable", False):
                raise ValueError(f"tensor {name!r}: cannot be quantized: " + getattr(
                    param, "quant_refusal", "only linear layers, embeddings and the LM head are"))
            try:
                param.weight_loader(param, tensor, shard_id)
            except ValueError as e:
                raise ValueError(f"tensor {name!r}: {e}") from None
            loaded.add((param_name, shard_id))
        missing = [
            self.checkpoint_name(n, s)
            for n, p in params.items()
            for s in p.shard_ids
            if (n, s) not in loaded
        ]
        if missing:
            shown = ", ".join(missing[:6]) + (", ..." if len(missing) > 6 else "")
            raise ValueError(f"missing weights ({len(missing)}): {shown}")
        if tied and not self.stage.first:  # the last stage embeds nothing: the LM head may keep
            self.model.embed_tokens, self.lm_head.tied = None, False  # its packed copy alone

    def param_name(self, checkpoint_name: str) -> tuple[str, object]:
        """(our parameter's name, shard id) for a checkpoint tensor's name."""
        return _param_name(checkpoint_name)

    def checkpoint_name(self, param_name: str, shard_id: object) -> str:
        """param_name's inverse, to name a missing tensor as the checkpoint would."""
        return _checkpoint_name(param_name, shard_id)


def tied_lm_head(config: ModelConfig, model: nn.Module) -> ParallelLMHead:
    """The LM head; with tied embeddings, the embedding's weight."""
    lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
    if config.tie_word_embeddings:
        lm_head.weight = model.embed_tokens.weight
        lm_head.tied = True
    return lm_head


def _param_name(checkpoint_name: str) -> tuple[str, object]:
    for part, ours, shard in STACKED_PARAMS:
        if part in checkpoint_name:
            return checkpoint_name.replace(part, ours), shard
    return checkpoint_name, None


def _checkpoint_name(param_name: str, shard_id: object) -> str:
    for part, ours, shard in STACKED_PARAMS:
        if shard_id is not None and shard == shard_id and ours in param_name:
            return param_name.replace(ours, part)
    return param_name
