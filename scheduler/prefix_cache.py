"""The prefix cache: full computed blocks findable by chained hash, looked up longest prefix first.

The hash -> block map itself lives in the block pool, because reusing a free cached block must evict
it; this file decides which blocks to look up and register, and counts queries and hits.
"""

from __future__ import annotations

from pagedserve.scheduler.block_hash import extend_block_hashes
from pagedserve.scheduler.block_pool import Block, BlockHash, BlockPool
from pagedserve.scheduler.request import Request


class PrefixCache:
    def __init__(self, pool: BlockPool, block_size: int, enabled: bool) -> None:
        self.pool = pool
        self.block_size = block_size
        self.enabled = enabled
        self.query_tokens = 0
        self.hit_tokens = 0

    def _hashes(self, request: Request) -> list[BlockHash]:
        extend_block_hashes(request.block_hashes, request.all_token_ids, self.block_size,
                            request.extra_keys)
        return request.block_hashes

    def longest_prefix(self, request: Request) -> list[Block]:
        """Cached blocks for the longest cached prefix of the tokens the request holds.

        The hit is capped at num_tokens - 1 tokens: at least one token must be computed, since the
        executor samples only in a step that computes a request's last held token.
        """
        if not self.enabled:
            return []
        max_blocks = (request.num_tokens - 1) // self.block_size
        hit = []
        for block_hash in self._hashes(request)[:max_blocks]:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            hit.append(block)
        return hit

    def record_query(self, num_tokens: int, num_hit_tokens: int) -> None:
        if self.enabled:
            self.query_tokens += num_tokens
            self.hit_tokens += num_hit_tokens

    def register_computed(self, request: Request) -> None:
        """Offers the request's full computed blocks that were not offered yet to the cache."""
        # min: a step planned ahead counts the token the step before it samples as computed
        # before the scheduler holds it (Scheduler.schedule_ahead)
        num_full = min(request.num_computed_tokens, request.num_tokens) // self.block_size
        if not self.enabled or num_full <= request.num_blocks_offered_to_cache:
            return
        hashes = self._hashes(request)
        for i in range(request.num_blocks_offered_to_cache, num_full):
            self.pool.register(self.pool.blocks[request.block_ids[i]], hashes[i])
        request.num_blocks_offered_to_cache = num_full

    def pending_hashes(self, request: Request) -> list[BlockHash]:
        """Hashes of the full blocks the request holds tokens for but has not computed yet.

        A running request will register these soon; a sibling waits for them instead of
        computing the same KV twice.
        """
        if not self.enabled:
            return []
        num_full_held = request.num_tokens // self.block_size
        return self._hashes(request)[request.num_blocks_offered_to_cache:num_full_held]

    def clear(self) -> None:
        self.pool.clear_cache()
