"""Tests for tandem.engine.block_pool: exact block ids, LRU eviction, prefix hits, KV events."""

from __future__ import annotations

import pytest

from tandem.engine.block_pool import BlockPool, KVBlock, NoFreeBlocksError
from tandem.protocols import kv_events
from tandem.protocols.block_hash import block_hashes
from tandem.protocols.kv_events import AllBlocksCleared, BlockRemoved, BlockStored

BS = 4


def ids(blocks: list[KVBlock]) -> list[int]:
    return [b.block_id for b in blocks]


def free_order(pool: BlockPool) -> list[int]:
    """Block ids in the free queue, LRU first (reads the private queue on purpose)."""
    return list(pool._free)


def toks(start: int, n_blocks: int) -> list[int]:
    return list(range(start, start + n_blocks * BS))


def cache_request(pool: BlockPool, tokens: list[int]) -> tuple[list[KVBlock], list[int]]:
    """Allocate blocks for full-block ``tokens`` and register them all in the cache."""
    hashes = block_hashes(tokens, BS)
    blocks = pool.allocate(len(hashes))
    pool.cache_full_blocks(blocks, hashes, tokens, None)
    return blocks, hashes


# ---- allocation, accounting ---------------------------------------------------------------------


def test_allocate_pops_block_ids_in_order_with_ref_one():
    pool = BlockPool(num_blocks=6, block_size=BS)
    a = pool.allocate(2)
    b = pool.allocate(3)
    assert ids(a) == [0, 1]
    assert ids(b) == [2, 3, 4]
    assert all(blk.ref_count == 1 and blk.block_hash is None for blk in a + b)
    assert pool.allocate(0) == []
    assert free_order(pool) == [5]


def test_usage_and_num_free_blocks_track_references():
    pool = BlockPool(num_blocks=8, block_size=BS)
    assert pool.num_free_blocks == 8 and pool.usage == 0.0
    blocks = pool.allocate(2)
    assert pool.num_free_blocks == 6 and pool.usage == pytest.approx(0.25)
    pool.touch(blocks[:1])  # second reference: still one block in use
    assert pool.num_free_blocks == 6 and pool.usage == pytest.approx(0.25)
    pool.free(blocks)
    assert pool.num_free_blocks == 7 and pool.usage == pytest.approx(0.125)
    pool.free(blocks[:1])
    assert pool.num_free_blocks == 8 and pool.usage == 0.0


def test_cached_free_blocks_count_as_free():
    pool = BlockPool(num_blocks=4, block_size=BS)
    blocks, _ = cache_request(pool, toks(0, 2))
    pool.free(blocks[::-1])
    assert pool.num_free_blocks == 4
    assert pool.num_cached_blocks == 2
    assert pool.usage == 0.0


def test_allocate_raises_no_free_blocks_error_and_changes_nothing():
    pool = BlockPool(num_blocks=4, block_size=BS)
    pool.allocate(3)
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(2)
    assert issubclass(NoFreeBlocksError, RuntimeError)
    assert pool.num_free_blocks == 1
    assert ids(pool.allocate(1)) == [3]


def test_free_below_zero_raises_and_changes_nothing():
    pool = BlockPool(num_blocks=4, block_size=BS)
    blocks = pool.allocate(2)
    with pytest.raises(ValueError):
        pool.free([blocks[0], blocks[0]])  # one reference, freed twice
    assert blocks[0].ref_count == 1 and pool.num_free_blocks == 2
    pool.free(blocks)
    with pytest.raises(ValueError):
        pool.free(blocks[:1])
    assert blocks[0].ref_count == 0 and pool.num_free_blocks == 4


# ---- eviction order ------------------------------------------------------------------------------


def test_freed_blocks_are_reused_in_lru_free_order():
    pool = BlockPool(num_blocks=6, block_size=BS)
    a = pool.allocate(2)  # 0, 1
    b = pool.allocate(2)  # 2, 3
    pool.free(b)
    pool.free(a)
    # Never-used 4, 5 come first, then blocks in the order they were freed.
    assert free_order(pool) == [4, 5, 2, 3, 0, 1]
    assert ids(pool.allocate(6)) == [4, 5, 2, 3, 0, 1]


def test_reverse_free_evicts_tail_blocks_before_shared_prefix():
    pool = BlockPool(num_blocks=4, block_size=BS)
    blocks, hashes = cache_request(pool, toks(0, 4))
    assert ids(blocks) == [0, 1, 2, 3]
    pool.free(blocks[::-1])  # the caller passes a request's blocks in reverse
    assert free_order(pool) == [3, 2, 1, 0]
    # Needing two blocks evicts the last two blocks of the sequence; the prefix stays cached.
    assert ids(pool.allocate(2)) == [3, 2]
    assert ids(pool.find_cached_blocks(hashes)) == [0, 1]


def test_touch_on_cached_free_block_removes_it_from_free_list_so_it_is_not_evicted():
    pool = BlockPool(num_blocks=4, block_size=BS)
    blocks, hashes = cache_request(pool, toks(0, 2))
    pool.free(blocks[::-1])
    assert free_order(pool) == [2, 3, 1, 0]
    hit = pool.find_cached_blocks(hashes[:1])
    assert ids(hit) == [0]
    pool.touch(hit)
    assert hit[0].ref_count == 1
    assert free_order(pool) == [2, 3, 1]
    got = pool.allocate(3)
    assert ids(got) == [2, 3, 1]
    assert 0 not in ids(got)
    assert pool.find_cached_blocks(hashes) == hit  # block 0 still cached; block 1 was evicted
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(1)


def test_touch_on_block_in_use_only_adds_a_reference():
    pool = BlockPool(num_blocks=4, block_size=BS)
    blocks, hashes = cache_request(pool, toks(0, 1))
    pool.touch(pool.find_cached_blocks(hashes))
    assert blocks[0].ref_count == 2
    assert pool.num_free_blocks == 3
    pool.free(blocks)
    assert blocks[0].ref_count == 1 and pool.num_free_blocks == 3


# ---- prefix cache hits ---------------------------------------------------------------------------


def test_find_cached_blocks_returns_longest_cached_prefix_without_changing_refs():
    pool = BlockPool(num_blocks=8, block_size=BS)
    tokens = toks(0, 3)
    blocks, hashes = cache_request(pool, tokens)
    pool.free(blocks[::-1])
    # Same first two blocks, different third block, then one more.
    other = tokens[: 2 * BS] + toks(100, 2)
    other_hashes = block_hashes(other, BS)
    assert other_hashes[:2] == hashes[:2] and other_hashes[2] != hashes[2]
    hits = pool.find_cached_blocks(other_hashes)
    assert ids(hits) == [0, 1]
    assert all(b.ref_count == 0 for b in hits)
    assert pool.find_cached_blocks(hashes) == blocks
    assert pool.find_cached_blocks(block_hashes(toks(500, 2), BS)) == []


def test_find_cached_blocks_stops_at_first_miss():
    pool = BlockPool(num_blocks=8, block_size=BS)
    blocks, hashes = cache_request(pool, toks(0, 3))
    pool.free(blocks[::-1])
    pool.allocate(5)  # never-used blocks 3..7
    assert ids(pool.allocate(1)) == [2]  # evicts the third block
    pool.touch(pool.find_cached_blocks(hashes[:1]))
    pool.allocate(1)  # evicts block 1 (middle of the chain); block 0 is held
    assert pool.find_cached_blocks(hashes[1:]) == []
    assert ids(pool.find_cached_blocks(hashes)) == [0]


def test_hit_rate_counters_count_queried_and_hit_blocks():
    pool = BlockPool(num_blocks=8, block_size=BS)
    assert pool.prefix_cache_hit_rate == 0.0
    _, hashes = cache_request(pool, toks(0, 2))
    pool.find_cached_blocks(hashes + block_hashes(toks(0, 4), BS)[2:])  # 4 queried, 2 hit
    assert (pool.num_queried_blocks, pool.num_hit_blocks) == (4, 2)
    pool.find_cached_blocks(block_hashes(toks(900, 4), BS))  # 4 queried, 0 hit
    assert (pool.num_queried_blocks, pool.num_hit_blocks) == (8, 2)
    assert pool.prefix_cache_hit_rate == pytest.approx(0.25)


def test_duplicate_cache_keeps_first_mapping_and_leaves_second_block_unhashed():
    pool = BlockPool(num_blocks=6, block_size=BS)
    tokens = toks(0, 2)
    hashes = block_hashes(tokens, BS)
    first = pool.allocate(2)  # 0, 1
    second = pool.allocate(2)  # 2, 3: the same prompt computed concurrently
    pool.cache_full_blocks(first, hashes, tokens, None)
    pool.take_events()
    pool.cache_full_blocks(second, hashes, tokens, None)
    assert [b.block_hash for b in second] == [None, None]
    assert [b.block_hash for b in first] == hashes
    assert pool.find_cached_blocks(hashes) == first
    assert pool.take_events() == []  # nothing newly stored, nothing reported
    # The unhashed duplicates are freed and reused like any block, with no BlockRemoved.
    pool.free(second[::-1])
    pool.allocate(2)  # never-used 4, 5
    assert ids(pool.allocate(2)) == [3, 2]
    assert pool.take_events() == []
    assert pool.find_cached_blocks(hashes) == first


def test_duplicate_prefix_reports_only_new_tail_chained_from_last_duplicate():
    pool = BlockPool(num_blocks=8, block_size=BS)
    short = toks(0, 2)
    long = toks(0, 4)
    hs = block_hashes(long, BS)
    pool.cache_full_blocks(pool.allocate(2), hs[:2], short, None)
    pool.take_events()
    blocks = pool.allocate(4)
    pool.cache_full_blocks(blocks, hs, long, None)
    assert [b.block_hash for b in blocks] == [None, None, hs[2], hs[3]]
    assert pool.take_events() == [
        BlockStored(block_hashes=hs[2:], parent_block_hash=hs[1], token_ids=long[2 * BS :], block_size=BS)
    ]


def test_duplicate_between_new_blocks_splits_report_into_chained_runs():
    pool = BlockPool(num_blocks=4, block_size=BS)
    tokens = toks(0, 3)
    a_blocks, hs = cache_request(pool, tokens)
    pool.touch(a_blocks[1:2])  # another request holds the middle block
    pool.free(a_blocks[::-1])
    assert ids(pool.allocate(3)) == [3, 2, 0]  # evicts hs[2] and hs[0]; hs[1] stays in block 1
    pool.take_events()
    blocks = pool.blocks[3:] + pool.blocks[2:3] + pool.blocks[:1]
    pool.cache_full_blocks(blocks, hs, tokens, None)
    assert [b.block_hash for b in blocks] == [hs[0], None, hs[2]]
    events = pool.take_events()
    assert events == [
        BlockStored(block_hashes=[hs[0]], parent_block_hash=None, token_ids=tokens[:BS], block_size=BS),
        BlockStored(block_hashes=[hs[2]], parent_block_hash=hs[1], token_ids=tokens[2 * BS :], block_size=BS),
    ]
    for e in events:  # each run re-hashes correctly from its parent
        assert block_hashes(e.token_ids, BS, parent_hash=e.parent_block_hash) == e.block_hashes


def test_recaching_a_block_with_its_own_hash_is_a_no_op():
    pool = BlockPool(num_blocks=4, block_size=BS)
    tokens = toks(0, 2)
    blocks, hashes = cache_request(pool, tokens)
    pool.take_events()
    pool.cache_full_blocks(blocks, hashes, tokens, None)
    assert pool.take_events() == []
    assert pool.find_cached_blocks(hashes) == blocks
    with pytest.raises(ValueError):
        pool.cache_full_blocks(blocks[:1], hashes[1:], tokens[BS:], hashes[0])


def test_cache_full_blocks_validates_lengths():
    pool = BlockPool(num_blocks=4, block_size=BS)
    blocks = pool.allocate(2)
    hashes = block_hashes(toks(0, 2), BS)
    with pytest.raises(ValueError):
        pool.cache_full_blocks(blocks, hashes[:1], toks(0, 2), None)
    with pytest.raises(ValueError):
        pool.cache_full_blocks(blocks, hashes, toks(0, 2)[:-1], None)
    assert pool.num_cached_blocks == 0


# ---- KV events -----------------------------------------------------------------------------------


def test_events_are_ordered_with_parent_hashes_chained_across_calls():
    pool = BlockPool(num_blocks=8, block_size=BS)
    tokens = toks(0, 3)
    hs = block_hashes(tokens, BS)
    blocks = pool.allocate(3)
    pool.cache_full_blocks(blocks[:1], hs[:1], tokens[:BS], None)
    pool.cache_full_blocks(blocks[1:], hs[1:], tokens[BS:], hs[0])
    events = pool.take_events()
    assert events == [
        BlockStored(block_hashes=[hs[0]], parent_block_hash=None, token_ids=tokens[:BS], block_size=BS),
        BlockStored(block_hashes=hs[1:], parent_block_hash=hs[0], token_ids=tokens[BS:], block_size=BS),
    ]
    assert all(e.medium == kv_events.MEDIUM_GPU and e.lora_id is None for e in events)
    # Re-hashing token_ids from the parent reproduces the reported hashes (what a router does).
    assert block_hashes(events[1].token_ids, BS, parent_hash=events[1].parent_block_hash) == hs[1:]
    assert pool.take_events() == []  # take_events clears


def test_block_removed_is_emitted_exactly_on_eviction():
    pool = BlockPool(num_blocks=4, block_size=BS)
    blocks, hs = cache_request(pool, toks(0, 2))
    pool.take_events()
    pool.free(blocks[::-1])
    assert pool.take_events() == []  # freeing keeps the hash: no event
    assert ids(pool.allocate(2)) == [2, 3]  # never-used blocks: nothing evicted
    assert pool.take_events() == []
    assert ids(pool.allocate(2)) == [1, 0]
    assert pool.take_events() == [
        BlockRemoved(block_hashes=[hs[1]]),
        BlockRemoved(block_hashes=[hs[0]]),
    ]
    assert pool.num_cached_blocks == 0 and all(b.block_hash is None for b in blocks)


def test_event_sequence_store_evict_store_is_in_order():
    pool = BlockPool(num_blocks=2, block_size=BS)
    a_tok, b_tok = toks(0, 2), toks(50, 2)
    a_blocks, a_hs = cache_request(pool, a_tok)
    pool.free(a_blocks[::-1])
    b_blocks, b_hs = cache_request(pool, b_tok)
    assert ids(b_blocks) == [1, 0]
    assert pool.take_events() == [
        BlockStored(block_hashes=a_hs, parent_block_hash=None, token_ids=a_tok, block_size=BS),
        BlockRemoved(block_hashes=[a_hs[1]]),
        BlockRemoved(block_hashes=[a_hs[0]]),
        BlockStored(block_hashes=b_hs, parent_block_hash=None, token_ids=b_tok, block_size=BS),
    ]


def test_reset_prefix_cache_clears_hashes_and_emits_all_blocks_cleared():
    pool = BlockPool(num_blocks=4, block_size=BS)
    blocks, hs = cache_request(pool, toks(0, 2))
    pool.take_events()
    pool.free(blocks[::-1])
    assert pool.reset_prefix_cache() is True
    assert pool.take_events() == [AllBlocksCleared()]
    assert pool.find_cached_blocks(hs) == []
    assert pool.num_cached_blocks == 0 and all(b.block_hash is None for b in blocks)
    pool.allocate(4)  # reuse after reset evicts nothing
    assert pool.take_events() == []


def test_reset_prefix_cache_refused_while_blocks_in_use():
    pool = BlockPool(num_blocks=4, block_size=BS)
    blocks, hs = cache_request(pool, toks(0, 2))
    pool.take_events()
    pool.free(blocks[1:])
    assert pool.reset_prefix_cache() is False
    assert pool.take_events() == []
    assert pool.find_cached_blocks(hs) == blocks
    pool.free(blocks[:1])
    assert pool.reset_prefix_cache() is True


def test_kv_events_disabled_records_nothing_but_cache_still_works():
    pool = BlockPool(num_blocks=2, block_size=BS, enable_kv_events=False)
    blocks, hs = cache_request(pool, toks(0, 2))
    assert pool.find_cached_blocks(hs) == blocks
    pool.free(blocks[::-1])
    pool.allocate(2)  # evicts both
    assert pool.reset_prefix_cache() is False
    assert pool.take_events() == []


def test_prefix_caching_disabled_gives_no_hits_and_no_events():
    pool = BlockPool(num_blocks=4, block_size=BS, enable_prefix_caching=False)
    tokens = toks(0, 2)
    hs = block_hashes(tokens, BS)
    blocks = pool.allocate(2)
    pool.cache_full_blocks(blocks, hs, tokens, None)
    assert [b.block_hash for b in blocks] == [None, None]
    assert pool.find_cached_blocks(hs) == []
    pool.free(blocks[::-1])
    assert ids(pool.allocate(4)) == [2, 3, 1, 0]
    assert pool.reset_prefix_cache() is False
    assert pool.take_events() == []
    assert pool.num_queried_blocks == 0 and pool.prefix_cache_hit_rate == 0.0


def test_events_round_trip_through_encode_and_decode_batch():
    pool = BlockPool(num_blocks=2, block_size=BS)
    blocks, _ = cache_request(pool, toks(0, 2))
    pool.free(blocks[::-1])
    pool.allocate(2)
    pool.free(pool.blocks)
    pool.reset_prefix_cache()
    events = pool.take_events()
    assert [type(e) for e in events] == [BlockStored, BlockRemoved, BlockRemoved, AllBlocksCleared]
    batch = kv_events.make_batch(events)
    decoded = kv_events.decode_batch(kv_events.encode_batch(batch))
    assert decoded.events == events
    assert decoded.ts == batch.ts
