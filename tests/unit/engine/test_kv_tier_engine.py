"""LLMEngine with KV tiers on the tiny random-weight Llama: outputs match an engine without tiers,
token for token and logprob for logprob, whichever tier serves a prefix; the tier counters show
which tier did.

The tiny model's greedy tokens hardly depend on the prompt's KV (it repeats one token), so each
output is compared with its logprobs too: they leave the tolerance when onboarded KV is off by
1 % (``test_the_comparison_catches_wrong_onboarded_kv``); a correct run matches to ~1e-7."""

from __future__ import annotations

import os
import random
import uuid
from pathlib import Path

import pytest
import torch

from tandem.engine.config import EngineConfig
from tandem.engine.kv_tiers.config import KvTierConfig
from tandem.engine.kv_tiers.disk_format import HEADER_BYTES, file_name
from tandem.engine.kv_tiers.host_segment import remove_segment
from tandem.engine.llm_engine import LLMEngine
from tandem.protocols.block_hash import block_hashes
from tandem.protocols.kv_events import AllBlocksCleared, BlockRemoved, BlockStored
from tandem.protocols.sampling_params import SamplingParams

BS = 16
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=0)
_rng = random.Random(0)
PROMPTS = [[_rng.randrange(256) for _ in range(70)] for _ in range(3)]
"""70 tokens each: 4 full blocks of 16 (all 4 reusable) and a partial one."""
HASHES = [block_hashes(p, BS) for p in PROMPTS]
LONG = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=0)
SHORT_PROMPTS = [p[:40] for p in PROMPTS]
NUM_BLOCKS = 6
"""A pool that holds one prompt (5 blocks) at a time: the next prompt evicts the previous one."""
LOGPROB_TOLERANCE = 1e-5

Output = list[tuple[int, float]]
"""A request's sampled tokens with their logprobs."""


def generate(
    engine: LLMEngine, prompts: list[list[int]], params: SamplingParams, settle_each_step: bool = False
) -> list[Output]:
    """``settle_each_step``: let the disk writes of a step land before the next one (so which tier
    serves a block does not depend on the writer thread's timing)."""
    ids = [f"r{engine.num_steps}-{i}" for i in range(len(prompts))]
    for rid, prompt in zip(ids, prompts):
        engine.add_request(rid, prompt, params)
    outputs: dict[str, Output] = {rid: [] for rid in ids}
    while any(rid in engine.requests for rid in ids):
        step_outputs = engine.step()
        if settle_each_step and engine.kv_tiers is not None:
            engine.kv_tiers.wait_for_writes()
        for out in step_outputs:
            assert out.logprobs is not None
            outputs[out.request_id].extend((lp.token_id, lp.logprob) for lp in out.logprobs)
    return [outputs[rid] for rid in ids]


def expected(outputs: list[Output]) -> list[list[tuple[int, object]]]:
    """The same tokens, and logprobs within LOGPROB_TOLERANCE."""
    return [[(token, pytest.approx(lp, abs=LOGPROB_TOLERANCE, rel=0)) for token, lp in out] for out in outputs]


def block_bytes(engine: LLMEngine) -> int:
    data = engine.runner.read_blocks([0])
    return data[0].numel() * data.element_size()


@pytest.fixture(scope="module")
def reference(tiny_loaded):
    """Outputs of an engine without tiers and a pool large enough for everything."""
    engine = LLMEngine(EngineConfig(num_kv_blocks=64, dtype="float32"), loaded=tiny_loaded)
    greedy = [generate(engine, [p], GREEDY)[0] for p in PROMPTS]
    long = [generate(engine, [p], LONG)[0] for p in SHORT_PROMPTS]
    one_block = block_bytes(engine)
    engine.close()
    return {"greedy": expected(greedy), "long": expected(long), "block_bytes": one_block}


@pytest.fixture
def engines(tiny_loaded, tmp_path):
    """Makes engines with tiers (a disk tier in tmp_path/disk unless told) and closes them at the
    end of the test."""
    made: list[LLMEngine] = []

    def make(num_kv_blocks: int = NUM_BLOCKS, **tiers) -> LLMEngine:
        if tiers.get("disk_cache_gib"):
            tiers.setdefault("disk_cache_dir", str(tmp_path / "disk"))
        tiers.setdefault("offload_policy", "evict")  # the cases below count what eviction copies
        config = EngineConfig(num_kv_blocks=num_kv_blocks, dtype="float32", kv_tiers=KvTierConfig(**tiers))
        engine = LLMEngine(config, loaded=tiny_loaded)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.close()


def settle(engine: LLMEngine) -> None:
    """Let queued disk writes land (and record their events) before the next request."""
    assert engine.kv_tiers is not None and engine.kv_tiers.wait_for_writes()


def run(engine: LLMEngine, order: list[int]) -> list[Output]:
    """The prompts one after the other (each alone in the engine)."""
    outputs = []
    for i in order:
        outputs.extend(generate(engine, [PROMPTS[i]], GREEDY))
        settle(engine)
    return outputs


def onboarded(engine: LLMEngine) -> tuple[int, int]:
    stats = engine.stats().tiers
    assert stats is not None
    return stats.onboarded_g2_g1, stats.onboarded_g3_g1


def test_a_prefix_served_from_the_host_tier(engines, reference):
    engine = engines(host_cache_gib=0.01)
    assert run(engine, [0, 1]) == reference["greedy"][:2]
    # Prompt 1 took prompt 0's blocks 3, 2, 1 from G1, in that order (a request's blocks are
    # freed tail first); block 0 is the last one out. Each goes down with its own parent.
    stored = [e for e in engine.take_kv_events() if isinstance(e, BlockStored) and e.medium == "CPU"]
    assert stored == [
        BlockStored([HASHES[0][i]], HASHES[0][i - 1], PROMPTS[0][i * BS : (i + 1) * BS], BS, medium="CPU")
        for i in (3, 2, 1)
    ]
    assert run(engine, [2]) == reference["greedy"][2:]
    assert onboarded(engine) == (0, 0)
    assert engine.tiers.host.match(HASHES[0]) == 4
    assert run(engine, [0]) == reference["greedy"][:1]
    assert onboarded(engine) == (4, 0)
    assert engine.stats().cached_prompt_tokens_total == 4 * BS


def test_a_prefix_served_from_the_disk_tier_without_a_host_tier(engines, reference):
    engine = engines(disk_cache_gib=0.01, disk_min_frequency=1)
    assert run(engine, [0, 1, 2]) == reference["greedy"]
    assert engine.stats().tiers.offloaded_g1_g3 == 7  # prompt 0's 4 blocks, prompt 1's last 3
    assert run(engine, [0]) == reference["greedy"][:1]
    assert onboarded(engine) == (0, 4)


def test_a_prefix_served_from_a_small_host_tier_and_the_disk_behind_it(engines, reference):
    slots = 4 * reference["block_bytes"] / 2**30
    engine = engines(host_cache_gib=slots, disk_cache_gib=0.01, disk_min_frequency=1)
    assert run(engine, [0, 1, 2]) == reference["greedy"]
    # The host tier took 7 blocks into 4 slots: prompt 0's blocks 1-3 went on to disk.
    stats = engine.stats().tiers
    assert (stats.host_capacity_blocks, stats.offloaded_g1_g2, stats.offloaded_g2_g3) == (4, 7, 3)
    assert engine.tiers.host.match(HASHES[0]) == 1 and engine.tiers.disk.match(HASHES[0][1:]) == 3
    assert run(engine, [0]) == reference["greedy"][:1]
    assert onboarded(engine) == (1, 3)


def test_the_disk_tier_serves_again_after_a_restart(engines, reference, tmp_path):
    tiers = dict(disk_cache_gib=0.01, disk_cache_dir=str(tmp_path / "restart"), disk_min_frequency=1)
    first = engines(**tiers)
    assert run(first, [0, 1, 2]) == reference["greedy"]
    first.close()
    second = engines(**tiers)
    assert second.stats().tiers.disk_blocks == 7
    found = {h for e in second.take_kv_events() if isinstance(e, BlockStored) for h in e.block_hashes}
    assert found == set(HASHES[0]) | set(HASHES[1][1:])
    assert all(isinstance(e, BlockStored) and e.medium == "DISK" for e in second.current_tier_events())
    assert run(second, [0]) == reference["greedy"][:1]
    assert onboarded(second) == (0, 4)


def test_write_through_copies_blocks_to_the_host_tier_as_they_are_computed(engines, reference):
    engine = engines(host_cache_gib=0.01, offload_policy="write-through")
    assert run(engine, [0]) == reference["greedy"][:1]
    stats = engine.stats().tiers
    assert (stats.offloaded_g1_g2, stats.host_blocks) == (4, 4)  # before any eviction
    assert engine.tiers.host.match(HASHES[0]) == 4
    assert run(engine, [1, 2]) == reference["greedy"][1:]
    assert engine.stats().tiers.offloaded_g1_g2 == 12  # evictions copied nothing again
    assert run(engine, [0]) == reference["greedy"][:1]
    assert onboarded(engine) == (4, 0)


def test_a_node_wide_host_tier_serves_another_engine(engines, reference, request):
    name = f"test-kvtier-engine-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    request.addfinalizer(lambda: remove_segment(name))
    first = engines(host_cache_gib=0.01, host_cache_shared=name)
    assert run(first, [0, 1, 2]) == reference["greedy"]
    second = engines(host_cache_gib=0.01, host_cache_shared=name)
    assert second.stats().tiers.host_shared == name
    assert run(second, [0]) == reference["greedy"][:1]
    assert onboarded(second) == (4, 0)
    assert second.reset_prefix_cache() and first.tiers.host.match(HASHES[0]) == 4  # not cleared


@pytest.mark.parametrize(
    ("tiers", "served_by"),
    [({"host_cache_gib": 0.01}, 0), ({"disk_cache_gib": 0.01, "disk_min_frequency": 1}, 1)],
    ids=["host", "disk"],
)
def test_outputs_are_unchanged_under_preemption(engines, reference, tiers, served_by):
    engine = engines(**tiers)
    # Three requests that each grow to 4 blocks, in a pool of 6.
    assert generate(engine, SHORT_PROMPTS, LONG, settle_each_step=True) == reference["long"]
    assert engine.scheduler.num_preemptions >= 1
    # The preempted request got at least one block back from the tier when it resumed.
    assert onboarded(engine)[served_by] >= 1
    assert onboarded(engine)[1 - served_by] == 0


def test_a_corrupt_disk_file_is_recomputed(engines, reference):
    engine = engines(disk_cache_gib=0.01, disk_min_frequency=1)
    assert run(engine, [0, 1, 2]) == reference["greedy"]
    engine.take_kv_events()
    [path] = Path(engine.tiers.disk.directory).glob(file_name(HASHES[0][1]))
    raw = bytearray(path.read_bytes())
    raw[HEADER_BYTES + 4 * BS + 100] ^= 0x01
    path.write_bytes(bytes(raw))
    assert run(engine, [0]) == reference["greedy"][:1]
    stats = engine.stats().tiers
    assert (stats.disk_corrupt_blocks, stats.onboarded_g3_g1) == (1, 1)  # block 0 came back, 1-3 recomputed
    assert not path.exists()
    assert BlockRemoved([HASHES[0][1]], medium="DISK") in engine.take_kv_events()


def test_kv_events_merge_tier_events_and_reset_clears_the_tiers(engines, reference):
    engine = engines(host_cache_gib=0.01)
    run(engine, [0, 1])
    events = engine.take_kv_events()
    mediums = [e.medium for e in events if not isinstance(e, BlockRemoved)]
    assert set(mediums) == {"GPU", "CPU"}
    # A block the pool evicts is reported stored in the tier before it is reported gone from
    # the pool (a router can still resolve its parent then).
    position = {
        (type(e).__name__, e.medium, h): i
        for i, e in enumerate(events)
        if not isinstance(e, AllBlocksCleared)
        for h in e.block_hashes
    }
    for h in HASHES[0][1:4]:
        assert position[("BlockStored", "CPU", h)] < position[("BlockRemoved", "GPU", h)]
    assert engine.current_tier_events() == [
        BlockStored(HASHES[0][1:4], HASHES[0][0], PROMPTS[0][16:64], BS, medium="CPU")
    ]
    assert engine.reset_prefix_cache()
    events = engine.take_kv_events()
    assert events == [BlockRemoved([HASHES[0][i] for i in (3, 2, 1)], medium="CPU"), AllBlocksCleared()]
    assert engine.current_tier_events() == [] and engine.stats().tiers.host_blocks == 0


def test_the_comparison_catches_wrong_onboarded_kv(engines, reference, monkeypatch):
    engine = engines(host_cache_gib=0.01)
    run(engine, [0, 1, 2])
    write_blocks = engine.scheduler.tiers.write_blocks

    def off_by_one_percent(block_ids: list[int], data: torch.Tensor) -> None:
        write_blocks(block_ids, data * 1.01)

    monkeypatch.setattr(engine.scheduler.tiers, "write_blocks", off_by_one_percent)
    [out] = run(engine, [0])
    assert onboarded(engine) == (4, 0)
    assert [token for token, _ in out] == [token for token, _ in reference["greedy"][0]]  # tokens alone miss it
    assert out != reference["greedy"][0]


def test_a_prefix_reused_in_g1_reaches_the_disk_tier_with_the_default_filter(engines, reference):
    engine = engines(disk_cache_gib=0.01)
    assert run(engine, [0, 0, 1, 2]) == [reference["greedy"][0], *reference["greedy"]]
    assert engine.stats().tiers.offloaded_g1_g3 == 4  # prompt 0's blocks were used twice
    assert run(engine, [0]) == reference["greedy"][:1]
    assert onboarded(engine) == (0, 4)
