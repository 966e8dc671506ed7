"""The block pool: free-queue order, reference counts, eviction of cached blocks."""

import pytest

from pagedserve.scheduler.block_pool import Block, BlockPool, FreeBlockQueue


def ids(blocks: object) -> list[int]:
    return [b.block_id for b in blocks]  # type: ignore[attr-defined]


def test_free_queue_is_a_linked_list_with_o1_removal() -> None:
    blocks = [Block(i) for i in range(5)]
    q = FreeBlockQueue(blocks)
    assert len(q) == 5 and ids(q) == [0, 1, 2, 3, 4]
    q.remove(blocks[2])
    assert ids(q) == [0, 1, 3, 4]
    q.appendleft(blocks[2])
    q.remove(blocks[4])
    q.append(blocks[4])
    assert ids(q) == [2, 0, 1, 3, 4]
    assert q.popleft() is blocks[2]
    assert len(q) == 4
    with pytest.raises(AssertionError):
        q.remove(blocks[2])  # not queued any more
    with pytest.raises(AssertionError):
        q.append(blocks[0])  # already queued


def test_allocate_from_head_and_free_order() -> None:
    pool = BlockPool(6)
    a = pool.allocate(3)
    assert ids(a) == [0, 1, 2] and pool.num_free == 3
    assert all(b.ref_count == 1 for b in a)
    pool.register(a[0], b"h0")
    pool.free(reversed(a))  # uncached 2, 1 go to the head; cached 0 goes to the tail
    assert ids(pool.free_queue) == [1, 2, 3, 4, 5, 0]
    # uncached blocks are reused before the cached one
    assert ids(pool.allocate(5)) == [1, 2, 3, 4, 5]
    assert pool.lookup(b"h0") is a[0]


def test_reusing_a_cached_block_evicts_its_hash() -> None:
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    pool.register(a, b"ha")
    pool.register(b, b"hb")
    pool.free([a, b])
    (c,) = pool.allocate(1)
    assert c is a and c.block_hash is None
    assert pool.lookup(b"ha") is None and pool.lookup(b"hb") is b


def test_lru_eviction_of_cached_blocks() -> None:
    pool = BlockPool(4)
    blocks = pool.allocate(4)
    for i, block in enumerate(blocks):
        pool.register(block, bytes([i]))
    # freed in the order 2, 0, 3, 1: the least recently freed is evicted first
    for i in (2, 0, 3, 1):
        pool.free([blocks[i]])
    # a prefix hit on block 0 takes it out of the middle; freeing it again makes it most recent
    pool.touch([blocks[0]])
    assert ids(pool.free_queue) == [2, 3, 1]
    pool.free([blocks[0]])
    assert ids(pool.free_queue) == [2, 3, 1, 0]
    evicted = pool.allocate(2)
    assert ids(evicted) == [2, 3]
    assert set(pool.cached) == {bytes([1]), bytes([0])}


def test_touch_counts_references_and_free_never_goes_negative() -> None:
    pool = BlockPool(2)
    (a,) = pool.allocate(1)
    pool.register(a, b"x")
    pool.touch([a])
    assert a.ref_count == 2
    pool.free([a])
    assert a.ref_count == 1 and pool.num_free == 1
    pool.free([a])
    assert a.ref_count == 0 and pool.num_free == 2
    with pytest.raises(AssertionError):
        pool.free([a])


def test_register_keeps_the_first_block_for_a_hash() -> None:
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    pool.register(a, b"same")
    pool.register(b, b"same")
    assert pool.lookup(b"same") is a and b.block_hash is None


def test_over_allocation_and_clear_cache_preconditions() -> None:
    pool = BlockPool(2)
    with pytest.raises(AssertionError):
        pool.allocate(3)
    (a,) = pool.allocate(1)
    pool.register(a, b"h")
    with pytest.raises(AssertionError):
        pool.clear_cache()
    pool.free([a])
    pool.clear_cache()
    assert not pool.cached and a.block_hash is None and ids(pool.free_queue) == [0, 1]
