"""G2, the host tier: HostPool over a private HostSegment, and the node-wide (shared) segment."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid

import pytest
import torch

from tandem.engine.kv_tiers.block_meta import BlockMeta
from tandem.engine.kv_tiers.host_pool import HostPool
from tandem.engine.kv_tiers.host_segment import (
    READY,
    WRITING,
    HostSegment,
    SegmentError,
    remove_segment,
    segment_path,
)
from tandem.kernels.block_hash import block_hashes

BS = 4
SHAPE = [2, 2, BS, 1, 8]
DTYPE = torch.float32
BLOCK_BYTES = 2 * 2 * BS * 1 * 8 * 4
FP = 0x1234


def chain(n: int, start: int = 0, frequency: int = 1) -> list[BlockMeta]:
    """``n`` chained blocks of the tokens start, start+1, ... with their real sequence hashes."""
    tokens = list(range(start, start + n * BS))
    hashes = block_hashes(tokens, BS, 0)
    return [
        BlockMeta(h, hashes[i - 1] if i else None, 0, tuple(tokens[i * BS : (i + 1) * BS]), frequency)
        for i, h in enumerate(hashes)
    ]


def payload(*values: float) -> torch.Tensor:
    """One block per value, every element equal to it."""
    return torch.stack([torch.full(SHAPE, float(v), dtype=DTYPE) for v in values])


def private_pool(num_slots: int) -> HostPool:
    return HostPool(HostSegment.private(num_slots, BS, BLOCK_BYTES, FP), SHAPE, DTYPE)


def hashes_of(metas: list[BlockMeta]) -> list[int]:
    return [m.block_hash for m in metas]


@pytest.fixture
def shm_name(request: pytest.FixtureRequest) -> str:
    name = f"test-kvtier-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    request.addfinalizer(lambda: remove_segment(name))
    return name


# ---- private pool ---------------------------------------------------------------------------------


def test_storing_past_capacity_evicts_exactly_the_least_recently_used():
    pool = private_pool(4)
    blocks = chain(6)
    for i, meta in enumerate(blocks[:4]):
        assert hashes_of(pool.store([meta], payload(i)).stored) == [meta.block_hash]
    result = pool.store(blocks[4:], payload(4, 5))
    assert hashes_of(result.evicted) == hashes_of(blocks[:2])
    assert hashes_of(result.stored) == hashes_of(blocks[4:])
    assert result.dropped == 0
    assert pool.num_used() == 4
    assert [pool.contains(m.block_hash) for m in blocks] == [False, False, True, True, True, True]
    assert hashes_of(pool.blocks()) == hashes_of(blocks[2:])  # least recently used first


def test_one_store_larger_than_the_pool_keeps_the_leading_blocks_and_drops_the_rest():
    pool = private_pool(2)
    blocks = chain(3)
    result = pool.store(blocks, payload(0, 1, 2))
    assert hashes_of(result.stored) == hashes_of(blocks[:2])
    assert result.dropped == 1 and result.evicted == []
    assert pool.match(hashes_of(blocks)) == 2


def test_a_read_makes_a_block_most_recently_used():
    pool = private_pool(3)
    a, b, c, d = chain(4)
    pool.store([a, b, c], payload(0, 1, 2))
    pool.read([a.block_hash])
    assert hashes_of(pool.store([d], payload(3)).evicted) == [b.block_hash]
    assert hashes_of(pool.blocks()) == hashes_of([c, a, d])


def test_re_storing_a_present_block_makes_it_most_recently_used():
    pool = private_pool(3)
    a, b, c, d = chain(4)
    pool.store([a, b, c], payload(0, 1, 2))
    pool.store([a], payload(9))
    assert hashes_of(pool.store([d], payload(3)).evicted) == [b.block_hash]


def test_match_and_contains_do_not_change_the_lru_order():
    pool = private_pool(2)
    a, b, c = chain(3)
    pool.store([a, b], payload(0, 1))
    assert pool.match([a.block_hash]) == 1 and pool.contains(a.block_hash)
    assert hashes_of(pool.store([c], payload(2)).evicted) == [a.block_hash]


def test_storing_a_present_block_copies_nothing_keeps_one_slot_and_raises_its_frequency():
    pool = private_pool(4)
    [a] = chain(1)
    pool.store([a], payload(1))
    again = BlockMeta(a.block_hash, a.parent_hash, a.hash_seed, a.token_ids, frequency=5)
    result = pool.store([again], payload(7))
    assert result.stored == [] and result.evicted == [] and result.dropped == 0
    assert pool.num_used() == 1
    [held] = pool.blocks()
    assert held.frequency == 5
    lower = BlockMeta(a.block_hash, a.parent_hash, a.hash_seed, a.token_ids, frequency=2)
    pool.store([lower], payload(8))
    assert pool.blocks()[0].frequency == 5  # max, never lowered
    metas, data = pool.read([a.block_hash])
    assert torch.equal(data, payload(1))  # the first bytes stay


def test_read_returns_the_leading_run_with_the_stored_bytes_and_metadata():
    pool = private_pool(4)
    a, b, c, d = chain(4)
    data = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(0))
    pool.store([a, b, d], data)
    metas, out = pool.read(hashes_of([a, b, c, d]))
    assert hashes_of(metas) == hashes_of([a, b])
    assert torch.equal(out, data[:2])
    assert [(m.parent_hash, m.token_ids, m.hash_seed) for m in metas] == [
        (None, a.token_ids, 0),
        (a.block_hash, b.token_ids, 0),
    ]
    assert [m.frequency for m in metas] == [2, 2]  # stored once, read once
    metas, out = pool.read([c.block_hash, a.block_hash])
    assert metas == [] and out.shape == (0, *SHAPE)


def test_keep_evicted_returns_bytes_only_for_evicted_blocks_used_often_enough():
    pool = private_pool(3)
    a, b, c = chain(3)
    a.frequency, b.frequency, c.frequency = 1, 2, 3
    pool.store([a, b, c], payload(10, 11, 12))
    x, y, z = chain(3, start=100)
    result = pool.store([x, y, z], payload(0, 1, 2), keep_evicted_min_frequency=2)
    assert hashes_of(result.evicted) == hashes_of([a, b, c])
    assert hashes_of(result.kept_evicted) == hashes_of([b, c])
    assert [m.frequency for m in result.kept_evicted] == [2, 3]
    assert len(result.evicted_data) == 2
    assert torch.equal(result.evicted_data[0], payload(11)[0])
    assert torch.equal(result.evicted_data[1], payload(12)[0])
    # The new blocks' bytes did not overwrite what was handed back.
    assert torch.equal(pool.read(hashes_of([x, y, z]))[1], payload(0, 1, 2))


def test_keep_evicted_zero_hands_back_no_bytes():
    pool = private_pool(1)
    [a] = chain(1, frequency=9)
    [b] = chain(1, start=50)
    pool.store([a], payload(1))
    result = pool.store([b], payload(2))
    assert hashes_of(result.evicted) == [a.block_hash]
    assert result.kept_evicted == [] and result.evicted_data == []


def test_clear_drops_every_block_of_a_private_pool():
    pool = private_pool(4)
    blocks = chain(3)
    pool.store(blocks, payload(0, 1, 2))
    assert sorted(pool.clear()) == sorted(hashes_of(blocks))
    assert pool.num_used() == 0 and pool.match(hashes_of(blocks)) == 0 and pool.blocks() == []
    assert hashes_of(pool.store(blocks[:1], payload(5)).stored) == hashes_of(blocks[:1])
    assert torch.equal(pool.read(hashes_of(blocks))[1], payload(5))


class _CopyHook:
    """Stands in for ``HostPool.data``: runs ``hook`` when read() copies the bytes out."""

    def __init__(self, data: torch.Tensor, hook) -> None:
        self._data, self._hook = data, hook

    def index_select(self, dim: int, index: torch.Tensor) -> torch.Tensor:
        self._hook()
        return self._data.index_select(dim, index)

    def __getitem__(self, key):
        return self._data[key]


def test_a_block_overwritten_between_lookup_and_copy_is_a_miss(shm_name, monkeypatch):
    pool = HostPool(HostSegment.attach(shm_name, 2, BS, BLOCK_BYTES, FP), SHAPE, DTYPE)
    other = HostPool(HostSegment.attach(shm_name, 2, BS, BLOCK_BYTES, FP), SHAPE, DTYPE)
    a, b = chain(2)
    [x] = chain(1, start=200)
    pool.store([a, b], payload(1, 2))

    def another_worker_evicts_b() -> None:
        other.read([a.block_hash])  # a becomes the most recently used: b is next out
        assert hashes_of(other.store([x], payload(9)).evicted) == [b.block_hash]

    monkeypatch.setattr(pool, "data", _CopyHook(pool.data, another_worker_evicts_b))
    metas, data = pool.read([a.block_hash, b.block_hash])
    assert hashes_of(metas) == [a.block_hash]
    assert torch.equal(data, payload(1))
    monkeypatch.undo()
    assert pool.match([a.block_hash, b.block_hash]) == 1
    assert torch.equal(pool.read([x.block_hash])[1], payload(9))


# ---- node-wide segment ----------------------------------------------------------------------------


def test_two_pools_on_one_segment_see_each_others_blocks(shm_name):
    first = HostPool(HostSegment.attach(shm_name, 4, BS, BLOCK_BYTES, FP), SHAPE, DTYPE)
    second = HostPool(HostSegment.attach(shm_name, 16, BS, BLOCK_BYTES, FP), SHAPE, DTYPE)
    assert first.shared and second.shared and second.num_slots == 4  # the existing size wins
    assert os.path.exists(segment_path(shm_name))
    a, b = chain(2)
    first.store([a], payload(3))
    second.store([b], payload(4))
    assert second.match(hashes_of([a, b])) == 2
    metas, data = first.read(hashes_of([a, b]))
    assert hashes_of(metas) == hashes_of([a, b]) and torch.equal(data, payload(3, 4))
    assert first.clear() == [] and second.num_used() == 2  # a node-wide tier is not cleared


@pytest.mark.parametrize(
    ("block_size", "block_bytes", "fingerprint"),
    [(BS, BLOCK_BYTES, FP + 1), (2 * BS, BLOCK_BYTES, FP), (BS, 2 * BLOCK_BYTES, FP)],
    ids=["fingerprint", "block_size", "block_bytes"],
)
def test_attaching_with_another_layout_is_refused(shm_name, block_size, block_bytes, fingerprint):
    HostSegment.attach(shm_name, 4, BS, BLOCK_BYTES, FP)
    with pytest.raises(SegmentError, match="holds KV blocks of another model, dtype or block size"):
        HostSegment.attach(shm_name, 4, block_size, block_bytes, fingerprint)


def test_creating_a_segment_without_a_size_is_refused(shm_name):
    with pytest.raises(SegmentError, match="does not exist yet and this worker gives it no size"):
        HostSegment.attach(shm_name, 0, BS, BLOCK_BYTES, FP)


_OTHER_PROCESS = textwrap.dedent(
    """
    import sys, torch
    from tandem.engine.kv_tiers.block_meta import BlockMeta
    from tandem.engine.kv_tiers.host_pool import HostPool
    from tandem.engine.kv_tiers.host_segment import HostSegment
    name, theirs, mine, parent = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    pool = HostPool(HostSegment.attach(name, 0, {bs}, {block_bytes}, {fp}), {shape}, torch.float32)
    metas, data = pool.read([theirs])
    assert [m.block_hash for m in metas] == [theirs] and bool((data == 3.0).all()), "cannot read"
    meta = BlockMeta(mine, parent, 0, tuple(range({bs}, {bs} * 2)))
    result = pool.store([meta], torch.full([1, *{shape}], 7.0))
    assert [m.block_hash for m in result.stored] == [mine]
    """
).format(bs=BS, block_bytes=BLOCK_BYTES, fp=FP, shape=SHAPE)


def test_a_block_stored_by_another_process_is_read_back(shm_name):
    pool = HostPool(HostSegment.attach(shm_name, 4, BS, BLOCK_BYTES, FP), SHAPE, DTYPE)
    a, b = chain(2)
    pool.store([a], payload(3))
    done = subprocess.run(
        [sys.executable, "-c", _OTHER_PROCESS, shm_name, str(a.block_hash), str(b.block_hash), str(a.block_hash)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    metas, data = pool.read(hashes_of([a, b]))
    assert hashes_of(metas) == hashes_of([a, b])
    assert metas[1].parent_hash == a.block_hash and metas[1].token_ids == b.token_ids
    assert torch.equal(data, payload(3, 7))


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _mark_writing(segment: HostSegment, slot: int, owner: int, block_hash: int) -> None:
    with segment.locked() as t:
        t.state[slot] = WRITING
        t.owner[slot] = owner
        t.hash[slot] = block_hash


def test_a_slot_left_writing_by_a_dead_process_is_reclaimed_when_space_is_needed(shm_name):
    segment = HostSegment.attach(shm_name, 2, BS, BLOCK_BYTES, FP)
    pool = HostPool(segment, SHAPE, DTYPE)
    a, b = chain(2)
    pool.store([a, b], payload(1, 2))
    _mark_writing(segment, 0, _dead_pid(), a.block_hash)
    _mark_writing(segment, 1, 1, b.block_hash)  # pid 1 is alive: its slot is left alone
    [x] = chain(1, start=300)
    result = pool.store([x], payload(5))
    assert hashes_of(result.stored) == [x.block_hash] and result.dropped == 0 and result.evicted == []
    with segment.locked() as t:
        assert [int(s) for s in t.state] == [READY, WRITING]
        assert int(t.hash[0]) == x.block_hash and int(t.owner[0]) == os.getpid()
    assert torch.equal(pool.read([x.block_hash])[1], payload(5))


def test_slots_written_by_live_processes_are_not_reclaimed(shm_name):
    segment = HostSegment.attach(shm_name, 2, BS, BLOCK_BYTES, FP)
    pool = HostPool(segment, SHAPE, DTYPE)
    a, b = chain(2)
    _mark_writing(segment, 0, 1, a.block_hash)
    _mark_writing(segment, 1, os.getpid(), b.block_hash)
    [x] = chain(1, start=300)
    result = pool.store([x], payload(5))
    assert result.stored == [] and result.dropped == 1
    assert pool.match([x.block_hash]) == 0
