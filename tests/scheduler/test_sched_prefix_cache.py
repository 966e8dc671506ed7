"""Chained block hashes, longest-prefix lookup, and sharing of prompt blocks between requests."""

from pagedserve.protos import executor_pb2
from pagedserve.scheduler.block_hash import extend_block_hashes, hash_block
from pagedserve.scheduler.block_pool import BlockPool
from pagedserve.scheduler.prefix_cache import PrefixCache
from pagedserve.scheduler.request import Request, StopParams
from tests.scheduler.sched_fakes import GREEDY, assert_all_free, make, run


def request(tokens: list[int], salt: str = "") -> Request:
    return Request("r", tokens, GREEDY, StopParams(max_tokens=4), 0, salt)


def test_hashes_chain_parent_tokens_and_extra_keys() -> None:
    root = hash_block(None, [1, 2])
    assert root == hash_block(None, [1, 2])
    assert root != hash_block(None, [2, 1])
    assert root != hash_block(None, [1, 2], ("salt",))
    assert hash_block(root, [3, 4]) != hash_block(hash_block(None, [9, 9]), [3, 4])
    hashes: list[bytes] = []
    extend_block_hashes(hashes, [1, 2, 3, 4, 5], block_size=2)
    assert hashes == [root, hash_block(root, [3, 4])]  # the partial block is not hashed
    extend_block_hashes(hashes, [1, 2, 3, 4, 5, 6], block_size=2)
    assert len(hashes) == 3


def cache_with(tokens: list[int], block_size: int = 4, salt: str = "") -> PrefixCache:
    """A cache holding the full computed blocks of one finished request."""
    pool = BlockPool(16)
    cache = PrefixCache(pool, block_size, enabled=True)
    owner = request(tokens, salt)
    owner.block_ids = [b.block_id for b in pool.allocate(-(-len(tokens) // block_size))]
    owner.num_computed_tokens = len(tokens)
    cache.register_computed(owner)
    pool.free(pool.blocks[i] for i in reversed(owner.block_ids))
    return cache


def test_longest_prefix_stops_at_the_first_miss_and_leaves_a_token() -> None:
    cache = cache_with(list(range(12)))  # three full blocks cached
    assert len(cache.longest_prefix(request(list(range(13))))) == 3
    assert len(cache.longest_prefix(request([*range(8), 99, 99, 99, 99, 99]))) == 2
    # an identical 12-token prompt may use only 11 tokens: two blocks
    assert len(cache.longest_prefix(request(list(range(12))))) == 2
    assert cache.longest_prefix(request([5, *range(1, 12)])) == []
    assert cache.longest_prefix(request(list(range(13)), salt="other")) == []


def test_salted_blocks_are_found_only_with_the_same_salt() -> None:
    cache = cache_with(list(range(8)), salt="tenant-a")
    assert len(cache.longest_prefix(request(list(range(9)), salt="tenant-a"))) == 2
    assert cache.longest_prefix(request(list(range(9)))) == []


def shared_prefix_run(enable: bool) -> tuple[object, object]:
    sched, _ = make(block_size=4, num_blocks=64, max_model_len=64, enable_prefix_caching=enable)
    system = list(range(100, 124))  # 24 tokens: six full blocks
    sched.add_request("first", [*system, 1, 2], GREEDY, max_tokens=3)
    first = run(sched)
    sched.add_request("second", [*system, 3], GREEDY, max_tokens=3)
    second = run(sched)
    return sched, (first, second)


def test_prefix_hits_are_counted() -> None:
    sched, (first, second) = shared_prefix_run(enable=True)
    assert first.cached["first"] == 0  # type: ignore[attr-defined]
    assert second.cached["second"] == 24  # type: ignore[attr-defined]
    stats = sched.stats()  # type: ignore[attr-defined]
    assert stats.prefix_cache_queries == 26 + 25
    assert stats.prefix_cache_hits == 24
    assert abs(stats.prefix_cache_hit_rate - 24 / 51) < 1e-9
    assert stats.blocks_cached > 0
    assert_all_free(sched)  # type: ignore[arg-type]


def test_no_hits_when_disabled() -> None:
    sched, (_, second) = shared_prefix_run(enable=False)
    assert second.cached["second"] == 0  # type: ignore[attr-defined]
    stats = sched.stats()  # type: ignore[attr-defined]
    assert stats.prefix_cache_hits == 0 and stats.prefix_cache_hit_rate == 0.0
    assert stats.blocks_cached == 0


def test_n_siblings_share_the_prompt_blocks() -> None:
    sched, fake = make(block_size=4, num_blocks=64, max_model_len=64)
    prompt = list(range(1, 19))  # 18 tokens: four full blocks
    ids = sched.add_request("p", prompt, GREEDY, max_tokens=4, n=3)
    assert ids == ["p-0", "p-1", "p-2"]
    out = run(sched)
    assert fake.records[0].new_ids == ["p-0"]  # siblings wait for the first one's prompt
    assert fake.records[1].new_ids == ["p-1", "p-2"]
    assert out.cached == {"p-0": 0, "p-1": 16, "p-2": 16}
    assert len({tuple(t) for t in out.tokens.values()}) == 3  # distinct ids, distinct outputs
    assert_all_free(sched)


def test_a_seeded_request_gives_each_child_its_own_seed() -> None:
    sched, fake = make()
    sched.add_request("s", [1, 2, 3], executor_pb2.SamplingParams(seed=7), max_tokens=2, n=2)
    sched.step()
    sched.step()
    seeds = {rid: req.sampling.seed for rid, req in fake.state.items()}
    assert seeds == {"s-0": 7, "s-1": 8}


def test_a_chunked_prompt_is_shared_once_computed() -> None:
    """A second request with the same long prompt waits while the first computes it in chunks."""
    sched, fake = make(block_size=4, num_blocks=64, max_model_len=64, max_num_batched_tokens=8)
    prompt = list(range(1, 30))
    sched.add_request("a", prompt, GREEDY, max_tokens=2)
    sched.add_request("b", prompt, GREEDY, max_tokens=2)
    sched.add_request("c", [7, 7], GREEDY, max_tokens=2)  # unrelated: may pass b
    out = run(sched)
    assert out.cached["b"] == 28
    assert fake.records[0].new_ids == ["a"]
    admitted = {rid: rec.step_id for rec in fake.records for rid in rec.new_ids}
    assert admitted["c"] < admitted["b"]  # b kept waiting for a's blocks; c passed it
    assert_all_free(sched)


def test_cached_blocks_are_evicted_least_recently_used_first() -> None:
    sched, _ = make(block_size=4, num_blocks=12, max_model_len=48, max_num_seqs=1)
    a = list(range(100, 117))  # 17 tokens + 1 output: four full blocks cached when done
    b = list(range(200, 217))
    sched.add_request("a", a, GREEDY, max_tokens=1)
    sched.add_request("b", b, GREEDY, max_tokens=1)
    run(sched)
    assert sched.stats().blocks_cached == 8  # a's 4, then b's 4: a is least recently used
    # c needs 6 blocks: the 4 uncached free ones, then a's two last blocks (a chain's tail first)
    sched.add_request("c", list(range(300, 321)), GREEDY, max_tokens=1)
    run(sched)
    # b2 first: a2's new blocks would evict b's least recently used ones otherwise
    sched.add_request("b2", [*b, 1], GREEDY, max_tokens=1)
    sched.add_request("a2", [*a, 1], GREEDY, max_tokens=1)
    out = run(sched)
    assert out.cached == {"a2": 8, "b2": 16}
    assert_all_free(sched)
