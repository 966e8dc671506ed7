"""The KV block pool: block ids, reference counts, the free queue and the hash -> block map.

Every block id 0..N-1 exists from the start. A block with ref_count 0 is free and sits in the free
queue, a doubly linked list threaded through the blocks themselves:

    head -> [uncached free blocks, most recently freed first] [cached free blocks, LRU first] <- tail

Allocation pops from the head, so blocks with no hash are reused before cached ones, and cached ones
are evicted least-recently-freed first. Freeing a cached block appends it at the tail; freeing an
uncached one puts it at the head. A prefix-cache hit on a free cached block takes it out of the
middle of the queue in O(1). Reusing a cached block drops its hash from the cache (eviction).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

BlockHash = bytes


class Block:
    """One KV page. The free-queue links live here so removal from the middle is O(1)."""

    __slots__ = ("block_hash", "block_id", "next_free", "prev_free", "ref_count")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.block_hash: BlockHash | None = None
        self.prev_free: Block | None = None
        self.next_free: Block | None = None

    def __repr__(self) -> str:
        h = self.block_hash.hex()[:8] if self.block_hash else None
        return f"Block({self.block_id}, ref={self.ref_count}, hash={h})"


class FreeBlockQueue:
    """A doubly linked list of free blocks between two sentinels; every operation is O(1)."""

    def __init__(self, blocks: Iterable[Block]) -> None:
        self._head = Block(-1)
        self._tail = Block(-1)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self._len = 0
        for block in blocks:
            self.append(block)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[Block]:
        node = self._head.next_free
        while node is not self._tail:
            assert node is not None
            yield node
            node = node.next_free

    def _link_after(self, prev: Block, block: Block) -> None:
        assert block.prev_free is None and block.next_free is None, f"{block} already queued"
        nxt = prev.next_free
        assert nxt is not None
        block.prev_free, block.next_free = prev, nxt
        prev.next_free = block
        nxt.prev_free = block
        self._len += 1

    def append(self, block: Block) -> None:
        """Puts a block at the tail (reused last)."""
        assert self._tail.prev_free is not None
        self._link_after(self._tail.prev_free, block)

    def appendleft(self, block: Block) -> None:
        """Puts a block at the head (reused first)."""
        self._link_after(self._head, block)

    def remove(self, block: Block) -> None:
        """Takes a block out of the queue, wherever it is."""
        prev, nxt = block.prev_free, block.next_free
        assert prev is not None and nxt is not None, f"{block} is not in the free queue"
        prev.next_free = nxt
        nxt.prev_free = prev
        block.prev_free = block.next_free = None
        self._len -= 1

    def popleft(self) -> Block:
        block = self._head.next_free
        assert block is not None and block is not self._tail, "free queue is empty"
        self.remove(block)
        return block


class BlockPool:
    """Owns all blocks; hands them out, takes them back, and keeps the cache of full blocks."""

    def __init__(self, num_blocks: int) -> None:
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self.cached: dict[BlockHash, Block] = {}

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        """Blocks that can be allocated now (free, cached or not)."""
        return len(self.free_queue)

    def allocate(self, n: int) -> list[Block]:
        """Takes n blocks from the head of the free queue; evicts any cached one it reuses."""
        assert 0 <= n <= self.num_free, f"asked for {n} blocks, {self.num_free} free"
        out = []
        for _ in range(n):
            block = self.free_queue.popleft()
            assert block.ref_count == 0
            if block.block_hash is not None:
                del self.cached[block.block_hash]
                block.block_hash = None
            block.ref_count = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[Block]) -> None:
        """Adds a reference to blocks found in the prefix cache, taking free ones off the queue."""
        for block in blocks:
            if block.ref_count == 0:
                self.free_queue.remove(block)
            block.ref_count += 1

    def free(self, blocks: Iterable[Block]) -> None:
        """Drops one reference from each block; a block reaching 0 goes back to the free queue.

        Give a request's blocks last-first, so the tail of a cached chain is evicted before its head.
        """
        for block in blocks:
            block.ref_count -= 1
            assert block.ref_count >= 0, f"{block} freed more often than referenced"
            if block.ref_count == 0:
                if block.block_hash is None:
                    self.free_queue.appendleft(block)
                else:
                    self.free_queue.append(block)

    def lookup(self, block_hash: BlockHash) -> Block | None:
        return self.cached.get(block_hash)

    def register(self, block: Block, block_hash: BlockHash) -> None:
        """Makes a full, computed, referenced block findable by its hash.

        When another block already holds the same content, the first one stays the cached one.
        """
        assert block.ref_count > 0, f"registering unreferenced {block}"
        if block.block_hash is not None or block_hash in self.cached:
            return
        block.block_hash = block_hash
        self.cached[block_hash] = block

    def clear_cache(self) -> None:
        """Forgets every hash (the executor's KV is gone); every block must be free."""
        assert self.num_free == self.num_blocks, "clear_cache with blocks in use"
        for block in self.cached.values():
            block.block_hash = None
        self.cached.clear()
        self.free_queue = FreeBlockQueue([])
        for block in self.blocks:
            block.prev_free = block.next_free = None
            self.free_queue.append(block)
