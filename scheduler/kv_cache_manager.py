"""The page table: which blocks each request holds, grown and freed as the scheduler decides."""

from __future__ import annotations

from pagedserve.scheduler.block_pool import Block, BlockPool
from pagedserve.scheduler.config import SchedulerConfig
from pagedserve.scheduler.prefix_cache import PrefixCache
from pagedserve.scheduler.request import Request


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class KVCacheManager:
    def __init__(self, config: SchedulerConfig) -> None:
        self.block_size = config.block_size
        self.pool = BlockPool(config.num_kv_blocks)
        self.prefix_cache = PrefixCache(self.pool, config.block_size, config.enable_prefix_caching)

    def admit(self, request: Request, hit: list[Block], num_new_tokens: int) -> bool:
        """Gives a request that holds no blocks its cached prefix plus blocks for num_new_tokens.

        Returns False, changing nothing, when the pool cannot supply them. Free cached blocks in the
        hit count against the free pool, since taking them removes them from the free queue.
        """
        assert not request.block_ids, f"{request.request_id} already holds blocks"
        num_hit_tokens = len(hit) * self.block_size
        needed = blocks_for(num_hit_tokens + num_new_tokens, self.block_size) - len(hit)
        free_hits = sum(1 for block in hit if block.ref_count == 0)
        if needed > self.pool.num_free - free_hits:
            return False
        self.pool.touch(hit)
        new = self.pool.allocate(needed)
        request.block_ids = [b.block_id for b in (*hit, *new)]
        request.num_computed_tokens = num_hit_tokens
        request.num_cached_blocks = len(hit)
        request.num_sent_blocks = 0
        self.prefix_cache.record_query(request.num_tokens, num_hit_tokens)
        return True

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
        request.num_cached_blocks = 0

    def take_new_block_ids(self, request: Request) -> list[int]:
        """Block ids appended since the executor last heard of this request."""
        new = request.block_ids[request.num_sent_blocks:]
        request.num_sent_blocks = len(request.block_ids)
        return new

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks
