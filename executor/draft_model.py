"""Speculative decoding's draft model: a second, smaller model beside the target in the executor,
which proposes the drafts of the requests the scheduler lets speculate (greedy argmax, so
verification stays exact: executor/draft_rows.py).

Its KV cache is a second set of per-layer pools with the draft's own heads and head size, over the
SAME block ids and slots as the target's: the scheduler's block tables, reservations, rollback and
prefix cache serve both unchanged, and the pool is sized for both (bytes_per_block). The draft
computes, every step, the tokens the target computes, so a block the prefix cache holds has the
draft's KV as well as the target's. Each step, for a request holding c + 1 tokens (x, sampled
last step, is at position c) that may speculate k = 3:

    position               c     c+1   c+2   c+3
    catch-up pass          x                          -> d1  (with any token the draft is behind on)
    k - 1 decode passes          d1    d2             -> d2, d3
    target verifies        x     d1    d2    d3       -> accepted a, and one token more

The target then has c + 1 + a tokens computed, the draft c + 1 + min(a, k - 1): its count is cut
to the target's (settle), and the next step's catch-up pass starts at its own count, so the slots
past it (rejected drafts; d3 and the new token after a full acceptance) are rewritten before
anything reads them. The scheduler offers a block to the prefix cache when a result counts its
tokens computed, before it counts the drafts accepted in that step (scheduler.apply_result): every
token so counted is one the draft computed in that step or before, so a cached block (a prefix hit,
a resumed request) holds the draft's KV too. A stale draft row could only cost acceptance, never
change an output: the target verifies every proposal.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import structlog
import torch

from pagedserve.executor.gguf_loader import find_gguf, open_gguf
from pagedserve.executor.input_batch import InputBatch
from pagedserve.executor.kv_cache import KVCache
from pagedserve.executor.loader import load_model
from pagedserve.executor.model_config import ModelConfig
from pagedserve.executor.request_state import RequestState

log = structlog.get_logger("pagedserve.executor")
FIELD = "speculative_config.model"  # what a user set: errors name it


class DraftModel:
    def __init__(self, path: str, target_path: str, target: ModelConfig, dtype: torch.dtype,
                 device: torch.device) -> None:
        try:
            self.model, self.model_config = load_model(Path(path).expanduser(), dtype=dtype,
                                                       device=device)
        except (OSError, ValueError) as e:
            raise ValueError(f"{FIELD}: cannot load the draft model {path!r}: {e}") from None
        check_compatible(path, self.model_config, target_path, target)
        self.dtype = dtype  # its KV's (not a parameter's: a quantized weight's codes are ints)
        self.device = device
        self.kv_cache: KVCache | None = None
        self.computed: dict[str, int] = {}  # request id -> tokens whose draft KV is in its blocks

    def bytes_per_block(self, block_size: int) -> int:
        mc = self.model_config
        return KVCache.bytes_per_block(mc.num_layers, block_size, mc.num_kv_heads, mc.head_dim,
                                       self.dtype)

    def allocate(self, num_blocks: int, block_size: int) -> None:
        """The draft's pools: the target's block count and size, the draft's shapes."""
        mc = self.model_config
        self.kv_cache = KVCache(mc.num_layers, num_blocks, block_size, mc.num_kv_heads,
                                mc.head_dim, self.dtype, self.device)

    def check_max_model_len(self, max_model_len: int) -> None:
        if self.model_config.max_position_embeddings < max_model_len:
            raise ValueError(f"{FIELD}: the draft model's max_position_embeddings "
                             f"{self.model_config.max_position_embeddings} is less than "
                             f"max_model_len {max_model_len}; give a smaller max_model_len")

    # ---- requests ----------------------------------------------------------------------------

    def add(self, state: RequestState) -> None:
        """A new (or resumed) request: its prefix-cache hit holds the draft's KV too."""
        self.computed[state.request_id] = state.num_computed_tokens

    def forget(self, request_id: str) -> None:
        self.computed.pop(request_id, None)

    def settle(self, states: Sequence[RequestState]) -> None:
        """After verification: the draft's KV past the target's computed tokens is not valid."""
        for s in states:
            self.computed[s.request_id] = min(self.computed[s.request_id], s.num_computed_tokens)

    # ---- one step ----------------------------------------------------------------------------

    @torch.inference_mode()
    def propose(self, batch: InputBatch, scheduled: Sequence[tuple[RequestState, int]],
                wanted: dict[str, int]) -> dict[str, list[int]]:
        """Computes the draft's KV for every held token the target computes this step, and for
        each request in `wanted` (request id -> k) proposes k tokens after its held ones."""
        states = [s for s, _ in scheduled]
        starts = [self.computed[s.request_id] for s in states]
        ends = [min(s.num_computed_tokens + n, s.num_tokens) for s, n in scheduled]
        assert all(b <= s.num_computed_tokens for b, s in zip(starts, states)), "draft ahead"
        inputs = batch.prepare(states, [e - b for b, e in zip(starts, ends)], computed=starts)
        hidden = self._forward(inputs)
        for s, end in zip(states, ends):
            self.computed[s.request_id] = end
        picked = [i for i, s in enumerate(states) if wanted.get(s.request_id, 0) > 0]
        if not picked:
            return {}
        rows = inputs.last_token_indices[torch.tensor(picked, device=hidden.device)]
        first = self._greedy(hidden[rows])
        drafts = {states[i].request_id: [t] for i, t in zip(picked, first)}
        self._decode(batch, [states[i] for i in picked], drafts, wanted)
        return drafts

    def _decode(self, batch: InputBatch, states: list[RequestState],
                drafts: dict[str, list[int]], wanted: dict[str, int]) -> None:
        """k - 1 batched one-token passes: pass j computes draft j (at the held tokens' end
        + j - 1) and proposes draft j + 1, for the requests that want more than j."""
        for j in range(1, max(wanted[s.request_id] for s in states)):
            live = [s for s in states if wanted[s.request_id] > j]
            for s in live:
                batch.write_drafts(s, drafts[s.request_id])
            inputs = batch.prepare(live, [1] * len(live),
                                   computed=[s.num_tokens + j - 1 for s in live])
            for s, token in zip(live, self._greedy(self._forward(inputs))):
                drafts[s.request_id].append(token)
                self.computed[s.request_id] += 1

    def _forward(self, inputs) -> torch.Tensor:
        assert self.kv_cache is not None, "allocate() first"
        return self.model(inputs.input_ids, inputs.positions, inputs.attn, self.kv_cache)

    def _greedy(self, hidden: torch.Tensor) -> list[int]:
        return self.model.compute_logits(hidden).argmax(dim=-1).tolist()


# ---- compatibility ------------------------------------------------------------------------------


def check_compatible(path: str, draft: ModelConfig, target_path: str, target: ModelConfig) -> None:
    """ValueError naming speculative_config.model unless the draft's token ids mean what the
    target's do: the same vocab_size and, where both models carry a vocabulary, the same tokens."""
    if draft.vocab_size != target.vocab_size:
        raise ValueError(f"{FIELD}: the draft model's vocab_size {draft.vocab_size} differs from "
                         f"the target's {target.vocab_size}")
    ours, theirs = vocabulary(path), vocabulary(target_path)
    if ours is None or theirs is None:
        log.warning("draft model: no tokenizer to compare; vocab_size alone checked",
                    draft=path, target=target_path)
        return
    differ = [i for i in sorted(ours.keys() | theirs.keys()) if ours.get(i) != theirs.get(i)]
    if differ:
        i = differ[0]
        raise ValueError(f"{FIELD}: the draft model's tokenizer differs from the target's in "
                         f"{len(differ)} token ids (id {i}: {ours.get(i)!r} vs {theirs.get(i)!r})")


def vocabulary(model: str | Path) -> dict[int, str] | None:
    """Token id -> its spelling, from tokenizer.json or a GGUF file's metadata; None: neither."""
    tokenizer_json = Path(model).expanduser() / "tokenizer.json"
    if tokenizer_json.is_file():
        data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
        vocab = data.get("model", {}).get("vocab", {})
        if isinstance(vocab, list):  # Unigram: [[piece, score], ...]
            out = {i: piece for i, (piece, _) in enumerate(vocab)}
        else:
            out = {i: piece for piece, i in vocab.items()}
        out.update({t["id"]: t["content"] for t in data.get("added_tokens", [])})
        return out
    gguf_file = find_gguf(Path(model).expanduser())
    if gguf_file is None:
        return None
    field = open_gguf(gguf_file).get_field("tokenizer.ggml.tokens")
    return None if field is None else dict(enumerate(field.contents()))
