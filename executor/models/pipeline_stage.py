"""One pipeline stage of a model: which decoder layers it holds, and running them.

With pipeline_parallel_size M (executor/pipeline_parallel.py) the decoder layers are cut into M
contiguous ranges; stage s builds and loads only range s:

    stage 0:      embedding   layers [0, a)
    stage 1..:                layers [a, b) ...
    stage M-1:                layers [.., L)   final norm, LM head (and the embedding when the
                                               LM head is tied to it: it is the same tensor)

Layers of other stages are AbsentLayer placeholders, so a layer's index (its checkpoint name
`model.layers.{i}.`) stays the global one; the stage's KV cache holds its own layers only, layer
i at i - start. A stage that is not the last hands its hidden states and residual stream to the
next as a Carried. With one stage (the default) everything is held and nothing changes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from pagedserve.executor import parallel_state
from pagedserve.executor.attention_metadata import AttentionMetadata
from pagedserve.executor.kv_cache import KVCache

_LAYER_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class StageLayers:
    """Decoder layers [start, end) of num_layers, held by one pipeline stage."""

    start: int
    end: int
    num_layers: int

    @classmethod
    def of(cls, num_layers: int, stage: int, num_stages: int) -> StageLayers:
        """Stage `stage` of `num_stages`: L // M layers each, the first L % M stages one more
        (the last stage also runs the LM head)."""
        if num_stages > num_layers:
            raise ValueError(f"pipeline_parallel_size: {num_stages} stages for {num_layers} "
                             "layers (every stage needs at least one)")
        base, extra = divmod(num_layers, num_stages)
        start = stage * base + min(stage, extra)
        return cls(start, start + base + (stage < extra), num_layers)

    @classmethod
    def current(cls, num_layers: int) -> StageLayers:
        """This process's stage (executor/parallel_state.py's pipeline_parallel context)."""
        return cls.of(num_layers, parallel_state.pp_rank(), parallel_state.pp_size())

    @property
    def first(self) -> bool:
        return self.start == 0

    @property
    def last(self) -> bool:
        return self.end == self.num_layers

    @property
    def whole(self) -> bool:
        return self.first and self.last

    @property
    def layers(self) -> range:
        return range(self.start, self.end)

    def holds_embedding(self, tied: bool) -> bool:
        """Stage 0 embeds; the last stage's LM head is the embedding when tied."""
        return self.first or (self.last and tied)

    def holds(self, checkpoint_name: str, tied: bool) -> bool:
        """Whether this stage loads a checkpoint tensor (names it does not know: yes, so that
        the model's loader names an unexpected one)."""
        layer = _LAYER_NAME.search(checkpoint_name)
        if layer is not None:
            return int(layer[1]) in self.layers
        if ".embed_tokens." in checkpoint_name:
            return self.holds_embedding(tied)
        if checkpoint_name.startswith(("lm_head.", "model.norm.")):
            return self.last
        return True


class AbsentLayer(nn.Module):
    """A decoder layer that another pipeline stage holds: no weights, never called."""

    def forward(self, *args: object) -> None:
        raise RuntimeError("a decoder layer of another pipeline stage was called")


@dataclass
class Carried:
    """What a stage hands to the next: hidden states and the residual stream, [T, hidden] each."""

    hidden: torch.Tensor
    residual: torch.Tensor


def decoder_layers(stage: StageLayers, build: Callable[[int], nn.Module]) -> nn.ModuleList:
    """Layer i built where the stage holds it, an AbsentLayer elsewhere."""
    return nn.ModuleList(build(i) if i in stage.layers else AbsentLayer()
                         for i in range(stage.num_layers))


def run_layers(stage: StageLayers, layers: nn.ModuleList, norm: nn.Module | None,
               hidden: torch.Tensor, residual: torch.Tensor | None, attn: AttentionMetadata,
               kv_cache: KVCache, positions_of: Callable[[nn.Module], torch.Tensor]
               ) -> torch.Tensor | Carried:
    """The stage's layers over (hidden, residual); the final-norm hidden on the last stage,
    else what the next stage takes. positions_of(layer): what that layer's rotary reads."""
    for i in stage.layers:
        layer, j = layers[i], i - stage.start  # the stage's KV cache holds its layers only
        hidden, residual = layer(positions_of(layer), hidden, residual, attn, kv_cache.k[j],
                                 kv_cache.v[j])
    if not stage.last:
        return Carried(hidden, residual)
    hidden, _ = norm(hidden, residual)
    return hidden
