"""The scheduler with KV tiers below the pool: a fake TierOnboarding, then the real one (no model)."""

from __future__ import annotations

import torch

from tandem.engine.block_pool import BlockPool
from tandem.engine.kv_cache_manager import KVCacheManager
from tandem.engine.kv_tiers.block_meta import BlockMeta
from tandem.engine.kv_tiers.config import KvTierConfig
from tandem.engine.kv_tiers.onboard import TierOnboarder
from tandem.engine.kv_tiers.tiers import KvLayout, KvTiers
from tandem.engine.request import Request, RequestStatus
from tandem.engine.scheduler import Scheduler
from tandem.protocols.sampling_params import SamplingParams

BS = 4


class FakeTiers:
    """TierOnboarding with canned answers: ``available[rid]`` blocks held past the G1 hits,
    ``arrive[rid]`` what onboard reports (None: the load goes on until ``finished`` says)."""

    def __init__(self) -> None:
        self.available: dict[str, int] = {}
        self.arrive: dict[str, int | None] = {}
        self.finished: list[tuple[Request, int]] = []
        self.calls: list[tuple[str, str, int, int]] = []
        self.cancelled: list[str] = []

    def match(self, request: Request, first_block: int, num_blocks: int) -> int:
        self.calls.append(("match", request.request_id, first_block, num_blocks))
        return min(self.available.get(request.request_id, 0), num_blocks)

    def onboard(self, request: Request, first_block: int, num_blocks: int) -> int | None:
        self.calls.append(("onboard", request.request_id, first_block, num_blocks))
        return self.arrive.get(request.request_id, num_blocks)

    def take_finished(self) -> list[tuple[Request, int]]:
        finished, self.finished = self.finished, []
        return finished

    def cancel(self, request: Request) -> None:
        self.cancelled.append(request.request_id)

    def wait(self, timeout: float) -> None:
        pass


def make(num_blocks=16, budget=32, max_seqs=8, tiers=None):
    pool = BlockPool(num_blocks, BS)
    sched = Scheduler(KVCacheManager(pool), budget, max_seqs, max_model_len=1000)
    sched.tiers = tiers if tiers is not None else FakeTiers()
    return sched, pool


def req(rid, n, start=0, max_tokens=8):
    return Request(rid, list(range(start, start + n)), SamplingParams(max_tokens=max_tokens), BS)


def run_step(sched):
    """Schedule, 'compute', and append token 7 to every due request. Returns the output."""
    out = sched.schedule()
    for r in sched.finish_step(out):
        r.append_output_token(7)
    return out


def chunks(out):
    return [(c.request.request_id, c.num_tokens) for c in out.chunks]


def onboard_calls(tiers: FakeTiers):
    return [c for c in tiers.calls if c[0] == "onboard"]


def test_tier_hits_after_g1_hits_are_onboarded_into_fresh_blocks():
    sched, pool = make()
    tiers = sched.tiers
    a = req("a", 5)
    sched.add_request(a)
    run_step(sched)  # a's first block is now in the G1 cache
    g1_block = a.block_table[0]
    sched.finish_request(a, RequestStatus.FINISHED_STOPPED)
    b = req("b", 17)  # 4 full blocks: 1 in G1, the next 2 in the tiers, the last computed
    tiers.available["b"] = 2
    sched.add_request(b)
    out = sched.schedule()
    assert tiers.calls[-2:] == [("match", "b", 1, 3), ("onboard", "b", 1, 2)]
    assert chunks(out) == [("b", 5)]
    assert b.num_computed_tokens == 12 and b.num_cached_tokens == 12
    assert len(b.block_table) == 5 and b.block_table[0] is g1_block
    assert [pool.is_cached(h) for h in b.block_hashes] == [True, True, True, False]
    assert pool.num_free_blocks == 16 - 5
    assert [r.request_id for r in sched.finish_step(out)] == ["b"]
    assert b.num_computed_tokens == 17 and pool.is_cached(b.block_hashes[3])


def test_a_partial_onboard_recomputes_the_rest_inside_the_allocated_blocks():
    sched, pool = make()
    tiers = sched.tiers
    b = req("b", 17, start=100)
    tiers.available["b"], tiers.arrive["b"] = 3, 1
    sched.add_request(b)
    out = sched.schedule()
    assert onboard_calls(tiers) == [("onboard", "b", 0, 3)]
    assert b.num_computed_tokens == 4 and b.num_cached_tokens == 4
    assert chunks(out) == [("b", 13)]
    assert len(b.block_table) == 5 and pool.num_free_blocks == 11
    assert [pool.is_cached(h) for h in b.block_hashes] == [True, False, False, False]
    sched.finish_step(out)
    assert b.num_computed_tokens == 17 and len(b.block_table) == 5 and pool.num_free_blocks == 11
    assert [pool.is_cached(h) for h in b.block_hashes] == [True, True, True, True]


def test_a_partial_onboard_under_a_small_budget_goes_on_in_chunks():
    sched, pool = make(budget=6)
    tiers = sched.tiers
    b = req("b", 17, start=100)
    tiers.available["b"], tiers.arrive["b"] = 3, 0
    sched.add_request(b)
    sizes = [chunks(run_step(sched)) for _ in range(3)]
    assert sizes == [[("b", 6)], [("b", 6)], [("b", 5)]]
    assert b.num_cached_tokens == 0 and b.num_output_tokens == 1
    assert len(b.block_table) == 5 and pool.num_free_blocks == 11


def test_an_async_onboard_parks_the_request_while_others_step():
    sched, pool = make()
    tiers = sched.tiers
    p, q = req("p", 17, start=200), req("q", 5, start=300)
    tiers.available["p"], tiers.arrive["p"] = 3, None
    sched.add_request(p)
    sched.add_request(q)
    assert chunks(run_step(sched)) == [("q", 5)]
    assert sched.loading == [p] and sched.running == [q]
    assert p.status is RequestStatus.WAITING and p.num_computed_tokens == 0 and len(p.block_table) == 5
    assert chunks(run_step(sched)) == [("q", 1)]  # nothing finished yet: p stays parked
    assert sched.loading == [p]
    tiers.finished = [(p, 3)]
    out = sched.schedule()
    assert chunks(out) == [("q", 1), ("p", 5)]
    assert sched.loading == [] and sched.running == [q, p]
    assert p.status is RequestStatus.RUNNING and p.num_computed_tokens == 12 and p.num_cached_tokens == 12
    assert [pool.is_cached(h) for h in p.block_hashes] == [True, True, True, False]
    assert len(p.block_table) == 5


def test_an_async_onboard_that_delivers_fewer_blocks_recomputes_the_rest():
    sched, _ = make()
    tiers = sched.tiers
    p = req("p", 17, start=200)
    tiers.available["p"], tiers.arrive["p"] = 3, None
    sched.add_request(p)
    assert chunks(run_step(sched)) == []
    tiers.finished = [(p, 1)]
    out = sched.schedule()
    assert chunks(out) == [("p", 13)] and p.num_cached_tokens == 4 and len(p.block_table) == 5


def test_aborting_a_parked_request_cancels_its_load_and_frees_its_blocks():
    sched, pool = make()
    tiers = sched.tiers
    p = req("p", 17, start=200)
    tiers.available["p"], tiers.arrive["p"] = 3, None
    sched.add_request(p)
    run_step(sched)
    assert pool.num_free_blocks == 11
    sched.finish_request(p, RequestStatus.FINISHED_ABORTED)
    assert tiers.cancelled == ["p"]
    assert sched.loading == [] and pool.num_free_blocks == 16 and p.block_table == []
    assert not sched.has_unfinished
    tiers.finished = [(p, 3)]  # a load that ends after all is ignored
    assert chunks(run_step(sched)) == [] and sched.running == []


def test_max_num_seqs_counts_parked_requests():
    sched, _ = make(max_seqs=1)
    tiers = sched.tiers
    p, q = req("p", 17, start=200), req("q", 5, start=300)
    tiers.available["p"], tiers.arrive["p"] = 3, None
    sched.add_request(p)
    sched.add_request(q)
    assert chunks(run_step(sched)) == []
    assert sched.loading == [p] and list(sched.waiting) == [q]
    tiers.finished = [(p, 3)]
    assert chunks(run_step(sched)) == [("p", 5)]
    assert list(sched.waiting) == [q]


def test_no_tier_match_for_a_prompt_covered_by_g1_hits():
    sched, _ = make()
    tiers = sched.tiers
    a = req("a", 9)
    sched.add_request(a)
    run_step(sched)
    sched.finish_request(a, RequestStatus.FINISHED_STOPPED)
    b = req("b", 9)  # its 2 reusable blocks are both in G1
    tiers.available["b"] = 2
    sched.add_request(b)
    out = sched.schedule()
    assert chunks(out) == [("b", 1)]
    assert [c for c in tiers.calls if c[1] == "b"] == []


# ---- the real onboarder ---------------------------------------------------------------------------

SHAPE = [2, 2, BS, 1, 8]
LAYOUT = KvLayout(BS, SHAPE, torch.float32, "test-kv-tier-scheduler")


def test_a_request_waiting_for_room_counts_one_host_use_when_admitted():
    tiers = KvTiers(KvTierConfig(host_cache_gib=8 * LAYOUT.block_bytes / 2**30), LAYOUT)
    try:
        sched, _ = make(num_blocks=4, tiers=None)
        written: list[int] = []
        sched.tiers = TierOnboarder(tiers, lambda ids, data: written.extend(ids))
        w = req("w", 9)
        metas = [
            BlockMeta(
                w.block_hashes[i], w.block_hashes[i - 1] if i else None, w.hash_seed, tuple(range(4 * i, 4 * i + 4))
            )
            for i in range(2)
        ]
        tiers.offload(metas, torch.zeros(2, *SHAPE))
        big = req("big", 13, start=100)
        sched.add_request(big)
        run_step(sched)  # big holds all 4 blocks
        sched.add_request(w)
        for _ in range(3):
            run_step(sched)  # w cannot get its 3 blocks
        assert list(sched.waiting) == [w]
        sched.finish_request(big, RequestStatus.FINISHED_STOPPED)
        out = sched.schedule()
        assert chunks(out) == [("w", 1)] and w.num_cached_tokens == 8
        assert sorted(written) == sorted(b.block_id for b in w.block_table[:2])
        stats = tiers.snapshot()
        assert stats.onboarded_g2_g1 == 2
        assert stats.host_hit_blocks == 2
        assert [m.frequency for m in tiers.host.blocks()] == [2, 2]
    finally:
        tiers.close()
