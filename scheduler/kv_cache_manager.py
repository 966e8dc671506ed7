"""The page table: which blocks each request holds, grown and freed as the scheduler decides.

The scheduler reaches blocks and the prefix cache only through this class: it asks for a request's
cached prefix, admits it, grows it, offers its computed blocks to the cache and frees it. The
manager writes a request's block fields (block_ids, num_sent_blocks, num_blocks_offered_to_cache);
the scheduler writes its token counts.
"""

from __future__ import annotations

from dataclasses import dataclass

from pagedserve.scheduler.block_pool import Block, BlockHash, BlockPool
from pagedserve.scheduler.config import SchedulerConfig
from pagedserve.scheduler.prefix_cache import PrefixCache
from pagedserve.scheduler.request import Request


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


@dataclass(frozen=True)
class KVStats:
    blocks_total: int
    blocks_free: int
    blocks_cached: int  # blocks findable by hash (in use or free)
    prefix_cache_query_tokens: int
    prefix_cache_hit_tokens: int


class KVCacheManager:
    def __init__(self, config: SchedulerConfig) -> None:
        self.block_size = config.block_size
        self.pool = BlockPool(config.num_kv_blocks)
        self.prefix_cache = PrefixCache(self.pool, config.block_size, config.enable_prefix_caching)

    def cached_prefix(self, request: Request) -> list[Block]:
        """The cached blocks of the longest cached prefix of the tokens the request holds."""
        return self.prefix_cache.longest_prefix(request)

    def admit(self, request: Request, hit: list[Block], num_new_tokens: int) -> int | None:
        """Gives a request that holds no blocks its cached prefix plus blocks for num_new_tokens;
        returns how many of its tokens the prefix covers (computed already).

        Returns None, changing nothing, when the pool cannot supply them. Free cached blocks in the
        hit count against the free pool, since taking them removes them from the free queue.
        """
        assert not request.block_ids, f"{request.request_id} already holds blocks"
        num_hit_tokens = len(hit) * self.block_size
        needed = blocks_for(num_hit_tokens + num_new_tokens, self.block_size) - len(hit)
        free_hits = sum(1 for block in hit if block.ref_count == 0)
        if needed > self.pool.num_free - free_hits:
            return None
        self.pool.touch(hit)
        new = self.pool.allocate(needed)
        request.block_ids = [b.block_id for b in (*hit, *new)]
        request.num_blocks_offered_to_cache = len(hit)
        request.num_sent_blocks = 0
        self.prefix_cache.record_query(request.num_tokens, num_hit_tokens)
        return num_hit_tokens

    def max_new_tokens(self, request: Request) -> int:
        """How many more tokens the request could compute with its blocks plus every free block."""
        capacity = (len(request.block_ids) + self.pool.num_free) * self.block_size
        return capacity - request.num_computed_tokens

    def grow(self, request: Request, num_new_tokens: int) -> None:
        """Appends the blocks a running request needs to compute num_new_tokens more tokens."""
        total = blocks_for(request.num_computed_tokens + num_new_tokens, self.block_size)
        new = self.pool.allocate(max(0, total - len(request.block_ids)))
        request.block_ids.extend(b.block_id for b in new)

    def free(self, request: Request) -> None:
        """Returns the request's blocks, last first, so cached chains are evicted tail first."""
        self.pool.free(self.pool.blocks[i] for i in reversed(request.block_ids))
        request.block_ids = []
        request.num_sent_blocks = 0
        request.num_blocks_offered_to_cache = 0

    def take_new_block_ids(self, request: Request) -> list[int]:
        """Block ids appended since the executor last heard of this request."""
        new = request.block_ids[request.num_sent_blocks:]
        request.num_sent_blocks = len(request.block_ids)
        return new

    def cache_computed_blocks(self, request: Request) -> None:
        """Offers the request's newly computed full blocks to the prefix cache."""
        self.prefix_cache.register_computed(request)

    def pending_hashes(self, request: Request) -> list[BlockHash]:
        """Hashes of full blocks the request holds tokens for but has not computed yet."""
        return self.prefix_cache.pending_hashes(request)

    def clear_prefix_cache(self) -> None:
        """Forgets every cached block (the executor that held their KV is gone)."""
        self.prefix_cache.clear()

    def stats(self) -> KVStats:
        pool, cache = self.pool, self.prefix_cache
        return KVStats(pool.num_blocks, pool.num_free, len(pool.cached), cache.query_tokens,
                       cache.hit_tokens)

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks
