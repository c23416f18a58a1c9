"""KvTiers (offload, match, events, stats) and TierOnboarder on a small layout, without a model."""

from __future__ import annotations

import logging
import os
import time

import pytest
import torch

from tandem.engine.block_pool import BlockPool
from tandem.engine.kv_tiers import tiers as tiers_module
from tandem.engine.kv_tiers.block_meta import BlockMeta
from tandem.engine.kv_tiers.config import KvTierConfig
from tandem.engine.kv_tiers.disk_format import file_name, file_size
from tandem.engine.kv_tiers.onboard import TierOnboarder
from tandem.engine.kv_tiers.tiers import KvLayout, KvTiers
from tandem.engine.request import Request
from tandem.kernels.block_hash import block_hashes
from tandem.protocols.block_hash import BLOCK_HASH_SEED
from tandem.protocols.kv_events import BlockRemoved, BlockStored
from tandem.protocols.sampling_params import SamplingParams

BS = 4
SHAPE = [2, 2, BS, 1, 8]
LAYOUT = KvLayout(BS, SHAPE, torch.float32, "test-kv-tier-layout")
BLOCK_BYTES = LAYOUT.block_bytes
FILE_BYTES = file_size(BS, BLOCK_BYTES)
SEED = BLOCK_HASH_SEED


def host_gib(slots: int) -> float:
    return slots * BLOCK_BYTES / 2**30


def disk_gib(blocks: int) -> float:
    return (blocks * FILE_BYTES + FILE_BYTES // 2) / 2**30


def chain(n: int, start: int = 0, frequency: int = 1) -> list[BlockMeta]:
    tokens = list(range(start, start + n * BS))
    hashes = block_hashes(tokens, BS, SEED)
    return [
        BlockMeta(h, hashes[i - 1] if i else None, SEED, tuple(tokens[i * BS : (i + 1) * BS]), frequency)
        for i, h in enumerate(hashes)
    ]


def payload(*values: float) -> torch.Tensor:
    return torch.stack([torch.full(SHAPE, float(v)) for v in values])


def hashes_of(metas: list[BlockMeta]) -> list[int]:
    return [m.block_hash for m in metas]


def tokens_of(metas: list[BlockMeta]) -> list[int]:
    return [t for m in metas for t in m.token_ids]


def settle(tiers: KvTiers) -> None:
    """Wait for queued disk writes (and the events and counters they record)."""
    assert tiers.wait_for_writes()


@pytest.fixture
def make_tiers(tmp_path):
    made: list[KvTiers] = []

    def make(**config) -> KvTiers:
        if config.get("disk_cache_gib"):
            config.setdefault("disk_cache_dir", str(tmp_path / "disk"))
        tiers = KvTiers(KvTierConfig(**config), LAYOUT)
        made.append(tiers)
        return tiers

    yield make
    for tiers in made:
        tiers.close()


# ---- offload --------------------------------------------------------------------------------------


def test_offload_stores_in_the_host_tier_and_reports_one_chained_cpu_event(make_tiers):
    tiers = make_tiers(host_cache_gib=host_gib(8))
    blocks = chain(3)
    tiers.offload(blocks, payload(0, 1, 2))
    assert tiers.take_events() == [
        BlockStored(
            block_hashes=hashes_of(blocks),
            parent_block_hash=None,
            token_ids=tokens_of(blocks),
            block_size=BS,
            medium="CPU",
        )
    ]
    stats = tiers.snapshot()
    assert (stats.offloaded_g1_g2, stats.host_blocks, stats.host_capacity_blocks) == (3, 3, 8)
    assert stats.offloaded_bytes == 3 * BLOCK_BYTES
    assert tiers.take_events() == []


def test_offloaded_blocks_that_do_not_chain_are_reported_as_separate_runs(make_tiers):
    tiers = make_tiers(host_cache_gib=host_gib(8))
    a, b, c, d = chain(4)
    tiers.offload([b, d], payload(1, 3))
    assert tiers.take_events() == [
        BlockStored([b.block_hash], a.block_hash, list(b.token_ids), BS, medium="CPU"),
        BlockStored([d.block_hash], c.block_hash, list(d.token_ids), BS, medium="CPU"),
    ]
    tiers.offload([b, c], payload(1, 2))  # b is already there: only c is new
    assert tiers.take_events() == [BlockStored([c.block_hash], b.block_hash, list(c.token_ids), BS, medium="CPU")]
    assert tiers.snapshot().offloaded_g1_g2 == 3


def test_host_overflow_moves_frequent_blocks_to_disk(make_tiers):
    tiers = make_tiers(host_cache_gib=host_gib(2), disk_cache_gib=disk_gib(8), disk_min_frequency=2)
    a, b, c, d = chain(4)
    a.frequency = 2
    tiers.offload([a, b], payload(0, 1))
    tiers.take_events()
    tiers.offload([c, d], payload(2, 3))
    settle(tiers)
    assert tiers.take_events() == [
        BlockRemoved([a.block_hash, b.block_hash], medium="CPU"),
        BlockStored([c.block_hash, d.block_hash], b.block_hash, tokens_of([c, d]), BS, medium="CPU"),
        BlockStored([a.block_hash], None, list(a.token_ids), BS, medium="DISK"),
    ]
    assert hashes_of(tiers.disk.blocks()) == [a.block_hash]  # b was used once: not kept
    assert os.listdir(tiers.disk.directory) == sorted([".lock", file_name(a.block_hash)])
    stats = tiers.snapshot()
    assert (stats.offloaded_g1_g2, stats.offloaded_g2_g3, stats.offloaded_g1_g3) == (4, 1, 0)
    assert (stats.host_blocks, stats.disk_blocks) == (2, 1)
    metas, data, dropped = tiers.disk.read([a.block_hash])
    assert hashes_of(metas) == [a.block_hash] and torch.equal(data, payload(0)) and dropped == []


def test_with_min_frequency_one_every_block_leaving_the_host_goes_to_disk(make_tiers):
    tiers = make_tiers(host_cache_gib=host_gib(2), disk_cache_gib=disk_gib(8), disk_min_frequency=1)
    a, b, c, d = chain(4)
    tiers.offload([a, b], payload(0, 1))
    tiers.offload([c, d], payload(2, 3))
    settle(tiers)
    assert hashes_of(tiers.disk.blocks()) == [a.block_hash, b.block_hash]
    assert tiers.snapshot().offloaded_g2_g3 == 2


def test_a_host_hit_counts_towards_the_disk_filter(make_tiers):
    tiers = make_tiers(host_cache_gib=host_gib(2), disk_cache_gib=disk_gib(8), disk_min_frequency=2)
    a, b, c, d = chain(4)
    tiers.offload([a, b], payload(0, 1))
    metas, _ = tiers.read_host([a.block_hash])
    assert [m.frequency for m in metas] == [2]
    tiers.offload([c, d], payload(2, 3))
    settle(tiers)
    assert hashes_of(tiers.disk.blocks()) == [a.block_hash]


def test_wait_for_writes_returns_after_the_queued_writes(make_tiers, monkeypatch):
    tiers = make_tiers(disk_cache_gib=disk_gib(8), disk_min_frequency=1)
    real_write = tiers.disk.write

    def slow_write(meta, data):
        time.sleep(0.05)
        return real_write(meta, data)

    monkeypatch.setattr(tiers.disk, "write", slow_write)
    tiers.offload(chain(3), payload(0, 1, 2))
    assert tiers.wait_for_writes()
    assert len(tiers.disk) == 3


def test_wait_for_writes_returns_after_the_writes_events_are_recorded(make_tiers, monkeypatch):
    tiers = make_tiers(disk_cache_gib=disk_gib(8), disk_min_frequency=1)
    real_stored_events = tiers_module.stored_events

    def slow_stored_events(metas, block_size, medium):  # the writer thread is descheduled here
        time.sleep(0.2)
        return real_stored_events(metas, block_size, medium)

    monkeypatch.setattr(tiers_module, "stored_events", slow_stored_events)
    [a] = chain(1)
    tiers.offload([a], payload(0))
    assert tiers.wait_for_writes()
    assert tiers.take_events() == [BlockStored([a.block_hash], None, list(a.token_ids), BS, medium="DISK")]


def test_without_a_host_tier_offload_writes_straight_to_disk(make_tiers):
    tiers = make_tiers(disk_cache_gib=disk_gib(8), disk_min_frequency=2)
    a, b = chain(2, frequency=2)
    tiers.offload([a, b], payload(5, 6))
    settle(tiers)
    assert tiers.host is None
    assert tiers.take_events() == [
        BlockStored([a.block_hash], None, list(a.token_ids), BS, medium="DISK"),
        BlockStored([b.block_hash], a.block_hash, list(b.token_ids), BS, medium="DISK"),
    ]
    stats = tiers.snapshot()
    assert (stats.offloaded_g1_g2, stats.offloaded_g2_g3, stats.offloaded_g1_g3) == (0, 0, 2)
    assert stats.disk_blocks == 2 and stats.disk_capacity_blocks == 8
    metas, data, _ = tiers.disk.read([a.block_hash, b.block_hash])
    assert hashes_of(metas) == [a.block_hash, b.block_hash] and torch.equal(data, payload(5, 6))


def test_disk_eviction_reports_removed_disk_blocks(make_tiers):
    tiers = make_tiers(disk_cache_gib=disk_gib(2), disk_min_frequency=1)
    a, b, c = chain(3)
    tiers.offload([a, b, c], payload(0, 1, 2))
    settle(tiers)
    events = tiers.take_events()
    assert BlockRemoved([a.block_hash], medium="DISK") in events
    assert hashes_of(tiers.disk.blocks()) == [b.block_hash, c.block_hash]


def test_needs_bytes(make_tiers):
    a, b = chain(2)
    a.frequency, b.frequency = 1, 2
    host = make_tiers(host_cache_gib=host_gib(4))
    host.offload([a], payload(0))
    assert host.needs_bytes([a, b]) == [False, True]  # a is held already
    disk_only = make_tiers(disk_cache_gib=disk_gib(4), disk_min_frequency=2)
    assert disk_only.needs_bytes([a, b]) == [False, True]  # a was used once: below the filter
    disk_only.offload([b], payload(1))
    settle(disk_only)
    assert disk_only.needs_bytes([a, b]) == [False, False]
    assert make_tiers().needs_bytes([a, b]) == [False, False]  # no tier at all


def test_needs_bytes_counts_a_use_of_blocks_already_held(make_tiers):
    tiers = make_tiers(host_cache_gib=host_gib(4))
    [a] = chain(1)
    tiers.offload([a], payload(0))
    again = BlockMeta(a.block_hash, a.parent_hash, a.hash_seed, a.token_ids, frequency=3)
    assert tiers.needs_bytes([again]) == [False]
    assert [m.frequency for m in tiers.host.blocks()] == [3]


def test_a_disk_directory_taken_by_another_engine_leaves_the_disk_tier_off(make_tiers, tmp_path, caplog):
    first = make_tiers(disk_cache_gib=disk_gib(4), disk_cache_dir=str(tmp_path / "shared"))
    with caplog.at_level(logging.ERROR, logger=tiers_module.__name__):
        second = make_tiers(
            host_cache_gib=host_gib(2), disk_cache_gib=disk_gib(4), disk_cache_dir=str(tmp_path / "shared")
        )
    assert first.disk is not None and second.disk is None
    assert "another engine uses the KV disk tier" in second.disk_unavailable
    assert second.snapshot().disk_unavailable == second.disk_unavailable
    assert [r.levelno for r in caplog.records] == [logging.ERROR]
    a, b, c = chain(3, frequency=5)
    second.offload([a, b], payload(0, 1))
    second.offload([c], payload(2))  # evicts a from G2: nowhere to go, nothing fails
    assert not second.host.contains(a.block_hash)
    assert hashes_of(second.lookup(hashes_of([b, c]))[0]) == hashes_of([b, c])
    assert second.snapshot().offloaded_g2_g3 == 0


# ---- match, read, events --------------------------------------------------------------------------


def test_lookup_copies_the_host_run_out_and_counts_the_disk_run_after_it(make_tiers):
    tiers = make_tiers(host_cache_gib=host_gib(8), disk_cache_gib=disk_gib(8))
    a, b, c, d, e = chain(5)
    tiers.offload([a, b, e], payload(0, 1, 4))
    assert tiers.disk.write(c, payload(2)[0]) == (True, [])
    assert tiers.disk.write(d, payload(3)[0]) == (True, [])
    metas, data, num_disk = tiers.lookup(hashes_of([a, b, c, d, e]))
    assert hashes_of(metas) == hashes_of([a, b]) and torch.equal(data, payload(0, 1))
    assert num_disk == 2  # c and d; e (back in G2 after the disk run) is not part of the match
    assert [m.frequency for m in metas] == [2, 2]  # the host run was read: a use
    stats = tiers.snapshot()
    assert (stats.lookups, stats.looked_up_blocks, stats.host_hit_blocks) == (1, 5, 2)


def test_lookup_of_a_disk_run_alone_and_of_nothing(make_tiers):
    tiers = make_tiers(host_cache_gib=host_gib(8), disk_cache_gib=disk_gib(8))
    a, b, c = chain(3)
    tiers.disk.write(a, payload(0)[0])
    tiers.disk.write(b, payload(1)[0])
    metas, data, num_disk = tiers.lookup(hashes_of([a, b, c]))
    assert metas == [] and data.shape == (0, *SHAPE) and num_disk == 2
    metas, data, num_disk = tiers.lookup([c.block_hash, a.block_hash])
    assert (metas, num_disk) == ([], 0)
    assert tiers.lookup([])[2] == 0
    assert tiers.snapshot().lookups == 2  # an empty lookup is not counted


def test_lookup_with_only_a_disk_tier(make_tiers):
    tiers = make_tiers(disk_cache_gib=disk_gib(8))
    a, b, c = chain(3)
    tiers.disk.write(a, payload(0)[0])
    tiers.disk.write(b, payload(1)[0])
    metas, _, num_disk = tiers.lookup(hashes_of([a, b, c]))
    assert metas == [] and num_disk == 2


def test_current_events_dump_every_block_parents_first(make_tiers):
    tiers = make_tiers(host_cache_gib=host_gib(8), disk_cache_gib=disk_gib(8))
    a, b, c = chain(3)
    x, y = chain(2, start=100)
    tiers.offload([b, a, c], payload(1, 0, 2))  # stored child first
    tiers.disk.write(y, payload(4)[0])
    tiers.disk.write(x, payload(3)[0])
    assert tiers.current_events() == [
        BlockStored(hashes_of([a, b, c]), None, tokens_of([a, b, c]), BS, medium="CPU"),
        BlockStored(hashes_of([x, y]), None, tokens_of([x, y]), BS, medium="DISK"),
    ]


def test_blocks_found_on_disk_at_start_are_reported(tmp_path):
    config = KvTierConfig(disk_cache_gib=disk_gib(8), disk_cache_dir=str(tmp_path), disk_min_frequency=1)
    first = KvTiers(config, LAYOUT)
    blocks = chain(3)
    first.offload(blocks, payload(0, 1, 2))
    settle(first)
    first.close()
    second = KvTiers(config, LAYOUT)
    try:
        assert second.take_events() == [BlockStored(hashes_of(blocks), None, tokens_of(blocks), BS, medium="DISK")]
        assert second.lookup(hashes_of(blocks))[2] == 3
    finally:
        second.close()


def test_clear_empties_both_private_tiers_and_reports_it(make_tiers):
    tiers = make_tiers(host_cache_gib=host_gib(4), disk_cache_gib=disk_gib(4))
    a, b = chain(2)
    tiers.offload([a], payload(0))
    tiers.disk.write(b, payload(1)[0])
    tiers.take_events()
    tiers.clear()
    assert tiers.take_events() == [
        BlockRemoved([a.block_hash], medium="CPU"),
        BlockRemoved([b.block_hash], medium="DISK"),
    ]
    metas, _, num_disk = tiers.lookup(hashes_of([a, b]))
    assert metas == [] and num_disk == 0
    assert os.listdir(tiers.disk.directory) == [".lock"]


def test_read_host_counts_host_hits(make_tiers):
    tiers = make_tiers(host_cache_gib=host_gib(4))
    a, b, c = chain(3)
    tiers.offload([a, b], payload(0, 1))
    metas, data = tiers.read_host(hashes_of([a, b, c]))
    assert hashes_of(metas) == [a.block_hash, b.block_hash] and torch.equal(data, payload(0, 1))
    assert tiers.snapshot().host_hit_blocks == 2
    assert tiers.read_host([])[1].shape == (0, *SHAPE)


# ---- onboarding into the pool ---------------------------------------------------------------------


class _Pool:
    """A fake engine pool: write_blocks records what lands in which block."""

    def __init__(self, num_blocks: int) -> None:
        self.pool = BlockPool(num_blocks, BS)
        self.written: dict[int, torch.Tensor] = {}

    def write_blocks(self, block_ids: list[int], data: torch.Tensor) -> None:
        for i, block_id in enumerate(block_ids):
            self.written[block_id] = data[i].clone()


def _request(rid: str, num_tokens: int, pool: BlockPool) -> Request:
    request = Request(rid, list(range(num_tokens)), SamplingParams(max_tokens=1), BS)
    request.block_table = pool.allocate(len(request.block_hashes))
    return request


def test_onboarder_copies_the_host_run_at_match_and_writes_it_at_onboard(make_tiers):
    tiers = make_tiers(host_cache_gib=host_gib(3))
    blocks = chain(3)
    tiers.offload(blocks, payload(0, 1, 2))
    fake = _Pool(8)
    onboarder = TierOnboarder(tiers, fake.write_blocks)
    request = _request("r", 3 * BS + 1, fake.pool)
    assert request.block_hashes == hashes_of(blocks)
    assert onboarder.match(request, 1, 2) == 2
    # Making room in G1 evicts blocks into G2 that push the matched ones out: they were copied.
    tiers.offload(chain(3, start=500), payload(7, 8, 9))
    assert tiers.lookup(hashes_of(blocks))[0] == []
    assert fake.written == {}
    assert onboarder.onboard(request, 1, 2) == 2
    ids = [b.block_id for b in request.block_table]
    assert sorted(fake.written) == ids[1:3]
    assert torch.equal(fake.written[ids[1]], payload(1)[0]) and torch.equal(fake.written[ids[2]], payload(2)[0])
    assert [b.num_hits for b in request.block_table] == [0, 2, 2]  # the tier's use count comes back
    stats = tiers.snapshot()
    assert (stats.onboarded_g2_g1, stats.onboarded_g3_g1, stats.onboards) == (2, 0, 1)
    assert stats.onboarded_bytes == 2 * BLOCK_BYTES


def test_onboard_without_a_matching_match_loads_nothing(make_tiers):
    tiers = make_tiers(host_cache_gib=host_gib(4))
    blocks = chain(2)
    tiers.offload(blocks, payload(0, 1))
    fake = _Pool(8)
    onboarder = TierOnboarder(tiers, fake.write_blocks)
    request = _request("r", 2 * BS + 1, fake.pool)
    assert onboarder.onboard(request, 0, 2) == 0  # no match before
    assert onboarder.match(request, 0, 2) == 2
    assert onboarder.onboard(request, 1, 1) == 0  # a match for other blocks
    assert onboarder.match(request, 0, 2) == 2
    onboarder.cancel(request)  # the request finished: its staged blocks go
    assert onboarder.onboard(request, 0, 2) == 0
    assert fake.written == {}


def test_onboarder_reads_disk_blocks_on_the_reader_thread(make_tiers):
    tiers = make_tiers(host_cache_gib=host_gib(8), disk_cache_gib=disk_gib(8))
    a, b, c = chain(3)
    tiers.offload([a], payload(0))
    tiers.disk.write(b, payload(1)[0])
    tiers.disk.write(c, payload(2)[0])
    fake = _Pool(8)
    onboarder = TierOnboarder(tiers, fake.write_blocks)
    request = _request("r", 3 * BS + 1, fake.pool)
    assert onboarder.match(request, 0, 3) == 3
    assert onboarder.onboard(request, 0, 3) is None  # a arrived, b and c are on their way
    ids = [blk.block_id for blk in request.block_table]
    assert sorted(fake.written) == [ids[0]]
    deadline = time.monotonic() + 10
    finished: list = []
    while not finished and time.monotonic() < deadline:
        onboarder.wait(0.1)
        finished = onboarder.take_finished()
    assert finished == [(request, 3)]
    assert sorted(fake.written) == sorted(ids)
    assert all(torch.equal(fake.written[ids[i]], payload(i)[0]) for i in range(3))
    stats = tiers.snapshot()
    assert (stats.onboarded_g2_g1, stats.onboarded_g3_g1, stats.disk_hit_blocks, stats.onboards) == (1, 2, 2, 1)
    assert onboarder.take_finished() == []


def test_onboarder_ends_a_disk_run_at_a_missing_file(make_tiers):
    tiers = make_tiers(disk_cache_gib=disk_gib(8))
    a, b, c = chain(3)
    for i, meta in enumerate([a, b, c]):
        tiers.disk.write(meta, payload(i)[0])
    fake = _Pool(8)
    onboarder = TierOnboarder(tiers, fake.write_blocks)
    request = _request("r", 3 * BS + 1, fake.pool)
    assert onboarder.match(request, 0, 3) == 3
    os.unlink(tiers.disk._path(b.block_hash))
    assert onboarder.onboard(request, 0, 3) is None
    tiers._reader.submit(lambda: None).result(timeout=10)
    assert onboarder.take_finished() == [(request, 1)]
    assert sorted(fake.written) == [request.block_table[0].block_id]
    assert tiers.take_events() == [BlockRemoved([b.block_hash], medium="DISK")]
    assert tiers.snapshot().disk_missing_blocks == 1


def test_a_cancelled_disk_load_writes_nothing(make_tiers):
    tiers = make_tiers(disk_cache_gib=disk_gib(8))
    [a] = chain(1)
    tiers.disk.write(a, payload(0)[0])
    fake = _Pool(8)
    onboarder = TierOnboarder(tiers, fake.write_blocks)
    request = _request("r", BS + 1, fake.pool)
    assert onboarder.match(request, 0, 1) == 1
    assert onboarder.onboard(request, 0, 1) is None
    onboarder.cancel(request)
    tiers._reader.submit(lambda: None).result(timeout=10)
    assert onboarder.take_finished() == []
    assert fake.written == {}


# ---- the pool's hook --------------------------------------------------------------------------------


def test_on_evict_sees_the_hits_of_the_blocks_it_gives_up():
    pool = BlockPool(2, BS)
    seen: list[tuple[int | None, int]] = []
    pool.on_evict = lambda blocks: seen.extend((b.block_hash, b.num_hits) for b in blocks)
    [blk] = pool.allocate(1)
    pool.cache_full_blocks([blk], [111], [1, 2, 3, 4], None)
    pool.free([blk])
    for _ in range(2):  # two prefix hits
        hits = pool.find_cached_blocks([111])
        pool.touch(hits)
        pool.free(hits)
    assert blk.num_hits == 2
    pool.allocate(2)
    assert seen == [(111, 2)]
