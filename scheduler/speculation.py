"""The scheduler's half of speculative decoding: which running requests get a proposal this step,
how long it may be, and what the executor's answer means.

A decoding request holds one token not yet computed (the one sampled last step). With a proposal
of k drafts it is scheduled 1 + k tokens: that token, then the drafts, in slots of its own blocks.
The executor answers with the drafts it accepted and one token more, so the request's computed
count grows by 1 + accepted (the KV of rejected drafts sits in slots that later tokens overwrite)
and its outputs by accepted + 1. A proposal never takes a block another running request may need
this step, never runs past max_tokens or max_model_len, and is skipped for constrained requests
(their grammar would have to follow each draft) and for batches above disable_by_batch_size.

With a draft model (method draft_model) the executor proposes: the scheduler reserves the same
slots and sends only how many drafts it may propose (ContinuingRequest.num_speculative_tokens);
here such a proposal is that many EXECUTOR_DRAFT placeholders, and the executor's answer, accepted
drafts and one more token, is read the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pagedserve.scheduler.ngram_proposer import propose_ngram
from pagedserve.scheduler.request import Request
from pagedserve.scheduler.speculative_config import SpeculativeConfig

# (the request's tokens, the config, the most tokens wanted) -> the proposed tokens
Proposer = Callable[[list[int], SpeculativeConfig, int], list[int]]
# A request whose proposals have mostly failed is proposed to only every POOR_EVERY-th step
# (a proposal costs its verification's compute): past POOR_MIN_DRAFTS drafted tokens, at an
# acceptance rate under POOR_RATE.
POOR_MIN_DRAFTS, POOR_RATE, POOR_EVERY = 32, 0.1, 8
EXECUTOR_DRAFT = -1  # a draft the executor's draft model will propose (its token unknown here)


@dataclass
class SpecCounters:
    draft_tokens: int = 0  # proposed
    accepted_tokens: int = 0  # of those, accepted
    verifications: int = 0  # proposals checked (one per request per step)


class Speculator:
    def __init__(self, config: SpeculativeConfig, block_size: int, max_model_len: int,
                 propose: Proposer = propose_ngram) -> None:
        self.config = config
        self.propose = propose  # a draft model would be another proposer
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.counters = SpecCounters()

    def drafts(self, req: Request, num_new: int, budget: int, spare_blocks: int,
               num_running: int) -> list[int]:
        """The tokens to propose for a running request about to compute num_new tokens."""
        if num_new != 1 or req.num_tokens - req.num_computed_tokens != 1:
            return []  # a prompt (chunk) or a resumed request: nothing to verify yet
        cap = self.config.disable_by_batch_size
        if req.sampling.structured.grammar or (cap is not None and num_running > cap):
            return []
        if (req.num_draft_tokens >= POOR_MIN_DRAFTS
                and req.num_accepted_draft_tokens < POOR_RATE * req.num_draft_tokens
                and req.num_output_tokens % POOR_EVERY):
            return []
        slots = len(req.block_ids) * self.block_size - req.num_computed_tokens - 1
        room = min(self.config.num_speculative_tokens, budget - 1,
                   self.max_model_len - req.num_tokens,
                   req.stop.max_tokens - req.num_output_tokens - 1,
                   slots + max(0, spare_blocks) * self.block_size)
        if room <= 0:
            return []
        if self.config.executor_proposes:
            return [EXECUTOR_DRAFT] * room
        return self.propose(req.all_token_ids, self.config, room)[:room]

    def accepted(self, req: Request, drafts: list[int], token_ids: list[int]) -> int:
        """How many drafts the executor accepted, from its output; RuntimeError if that output
        cannot be an answer to this proposal."""
        num_accepted = len(token_ids) - 1
        if num_accepted > len(drafts) or any(
                d != t for d, t in zip(drafts[:num_accepted], token_ids) if d != EXECUTOR_DRAFT):
            raise RuntimeError(f"executor sent {token_ids} for {req.request_id!r}, which does not "
                               f"answer the drafts {drafts}")
        if drafts:
            req.num_draft_tokens += len(drafts)
            req.num_accepted_draft_tokens += num_accepted
            c = self.counters
            c.draft_tokens += len(drafts)
            c.accepted_tokens += num_accepted
            c.verifications += 1
        return num_accepted
