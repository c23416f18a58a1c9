"""The mocker's modeled KV tiers: capacities in blocks, LRU and the disk filter, tier events,
onboarding that costs modeled time, a host tier shared by the mockers of one process, and the
virtual-time simulator paying for it."""

from __future__ import annotations

import uuid

import pytest

from tandem.bench.simulate import SimConfig, SimRequest, Simulation
from tandem.engine.kv_tiers.modeled import ModeledTierConfig
from tandem.engine.mocker import MockerConfig, MockerEngine
from tandem.protocols.block_hash import block_hashes
from tandem.protocols.kv_events import BlockRemoved, BlockStored
from tandem.protocols.sampling_params import SamplingParams

BS = 16
ONE = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
# Four prompts of 4 full blocks (+ 1 token): each fills a 5-block pool on its own.
PROMPTS = [list(range(1000 * (i + 1), 1000 * (i + 1) + 4 * BS + 1)) for i in range(4)]
HASHES = [block_hashes(p, BS) for p in PROMPTS]
BLOCK_BYTES = 1024 * BS  # kv_bytes_per_token 1024


def make(**tiers) -> MockerEngine:
    tiers.setdefault("offload_policy", "evict")  # the cases below count what eviction copies
    return MockerEngine(
        MockerConfig(num_kv_blocks=5, speedup_ratio=0.0, kv_bytes_per_token=1024, tiers=ModeledTierConfig(**tiers))
    )


def run(engine: MockerEngine, index: int) -> int:
    """Run PROMPTS[index] alone; returns its cached prompt tokens."""
    request_id = f"r{engine.num_steps}"
    engine.add_request(request_id, PROMPTS[index], ONE)
    cached = -1
    while engine.has_unfinished_requests:
        for out in engine.step():
            cached = out.num_cached_tokens
    return cached


def test_evicted_blocks_go_to_the_host_tier_and_come_back_with_their_modeled_time():
    engine = make(num_host_blocks=8, host_onboard_gbs=1.0)
    run(engine, 0)
    run(engine, 1)  # PROMPTS[0]'s 4 blocks leave the pool for the host tier
    assert list(engine.modeled_tiers.host.blocks) == [HASHES[0][i] for i in (3, 2, 1, 0)]
    stepped_before = engine.total_modeled_ms
    assert run(engine, 0) == 4 * BS
    stats = engine.stats().tiers
    assert (stats.offloaded_g1_g2, stats.onboarded_g2_g1, stats.onboarded_g3_g1) == (8, 4, 0)
    # 4 blocks of 16 KiB at 1 GB/s: 0.065536 ms on top of the step's own modeled time.
    assert stats.onboard_seconds_total == pytest.approx(4 * BLOCK_BYTES / 1e9)
    prefill_of_last_token = engine.config.step_ms(1, 0, 0.0)
    assert engine.total_modeled_ms - stepped_before == pytest.approx(prefill_of_last_token + 4 * BLOCK_BYTES / 1e6)


def test_host_overflow_goes_to_disk_only_for_blocks_used_often_enough():
    engine = make(num_host_blocks=4, num_disk_blocks=16, disk_min_frequency=2)
    for index in (0, 0, 1, 2):  # PROMPTS[0] is hit once in the pool: frequency 2
        run(engine, index)
    tiers = engine.modeled_tiers
    assert set(tiers.disk.blocks) == set(HASHES[0])  # pushed out of the host tier by PROMPTS[2]
    assert set(tiers.host.blocks) == set(HASHES[1])  # PROMPTS[1] was used once: never to disk
    assert run(engine, 0) == 4 * BS
    assert engine.stats().tiers.onboarded_g3_g1 == 4


def test_tier_events_name_the_medium_and_chain_to_parents():
    engine = make(num_host_blocks=2)
    run(engine, 0)
    engine.take_kv_events()
    run(engine, 1)
    events = [e for e in engine.take_kv_events() if getattr(e, "medium", None) == "CPU"]
    stored = [e for e in events if isinstance(e, BlockStored)]
    removed = [h for e in events if isinstance(e, BlockRemoved) for h in e.block_hashes]
    # Tail blocks leave the pool first; the 2-block host tier keeps the last two it got.
    assert [e.block_hashes for e in stored] == [[HASHES[0][i]] for i in (3, 2, 1, 0)]
    assert [e.parent_block_hash for e in stored] == [HASHES[0][2], HASHES[0][1], HASHES[0][0], None]
    assert removed == [HASHES[0][3], HASHES[0][2]]
    assert engine.current_tier_events() == [
        BlockStored([HASHES[0][0], HASHES[0][1]], None, PROMPTS[0][: 2 * BS], BS, medium="CPU")
    ]


def test_mockers_naming_one_host_tier_share_it():
    name = f"node-{uuid.uuid4().hex[:8]}"
    first = make(num_host_blocks=8, host_shared=name, offload_policy="write-through")
    second = make(num_host_blocks=8, host_shared=name)
    run(first, 0)  # written through: in the shared tier at once
    assert run(second, 0) == 4 * BS
    assert second.stats().tiers.onboarded_g2_g1 == 4
    assert first.tiers.node_tier_name == second.tiers.node_tier_name and name in first.tiers.node_tier_name


def test_tier_config_is_checked():
    with pytest.raises(ValueError, match="offload_policy"):
        ModeledTierConfig(num_host_blocks=1, offload_policy="sometimes")
    with pytest.raises(ValueError, match="prefix caching"):
        MockerEngine(MockerConfig(enable_prefix_caching=False, tiers=ModeledTierConfig(num_host_blocks=4)))


def test_the_simulator_routes_with_tier_credit_and_pays_for_onboarding():
    tiers = ModeledTierConfig(num_host_blocks=64, offload_policy="evict")
    mocker = MockerConfig(num_kv_blocks=6, kv_bytes_per_token=1024, tiers=tiers)
    sim = Simulation(SimConfig(num_agg=2, router="kv", mocker=mocker))
    # PROMPTS[0], then three others that push it out of every pool, then PROMPTS[0] again.
    order = [0, 1, 2, 3, 0]
    requests = [SimRequest(f"r{i}", PROMPTS[p], 2, 1000.0 * i) for i, p in enumerate(order)]
    results = sim.run(requests)
    assert results[-1].cached_tokens == 4 * BS  # onboarded from a host tier
    onboarded = {wid: w.core.stats().tiers.onboarded_g2_g1 for wid, w in sim.workers.items()}
    assert sorted(onboarded.values()) == [0, 4]
    assert sim.kv is not None and sim.kv.host_matched_blocks == 4  # the router saw them all in host memory
