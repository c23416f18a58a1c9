"""Scheduler + KV cache manager + block pool, driven by hand (no model)."""

from __future__ import annotations

import pytest

from tandem.engine.block_pool import BlockPool
from tandem.engine.kv_cache_manager import KVCacheManager
from tandem.engine.request import Request, RequestStatus
from tandem.engine.scheduler import Scheduler
from tandem.protocols.sampling_params import SamplingParams

BS = 4


def make(num_blocks=16, budget=32, max_seqs=8, caching=True):
    pool = BlockPool(num_blocks, BS, enable_prefix_caching=caching)
    return Scheduler(KVCacheManager(pool, caching), budget, max_seqs, max_model_len=1000), pool


def req(rid, n, start=0, max_tokens=8):
    return Request(rid, list(range(start, start + n)), SamplingParams(max_tokens=max_tokens), BS)


def run_step(sched):
    """Schedule, 'compute', and append token 7 to every due request. Returns the output."""
    out = sched.schedule()
    for r in sched.finish_step(out):
        r.append_output_token(7)
    return out


def test_token_budget_chunks_long_prefill():
    sched, _ = make(budget=10)
    r = req("a", 25)
    sched.add_request(r)
    sizes = []
    for _ in range(3):
        out = run_step(sched)
        assert out.num_batched_tokens <= 10
        sizes.append([(c.request.request_id, c.num_tokens) for c in out.chunks])
    assert sizes == [[("a", 10)], [("a", 10)], [("a", 5)]]
    assert r.num_output_tokens == 1  # sampled only when the whole prompt was computed


def test_decode_and_prefill_share_a_step():
    sched, _ = make(budget=8)
    a, b = req("a", 4), req("b", 20, start=100)
    sched.add_request(a)
    run_step(sched)  # a prefilled, has 1 output token
    sched.add_request(b)
    out = run_step(sched)
    assert [(c.request.request_id, c.num_tokens) for c in out.chunks] == [("a", 1), ("b", 7)]


def test_max_num_seqs_respected():
    sched, _ = make(budget=100, max_seqs=2)
    for i in range(4):
        sched.add_request(req(str(i), 3, start=10 * i))
    out = run_step(sched)
    assert len(out.chunks) == 2 and len(sched.running) == 2 and len(sched.waiting) == 2


def test_prefix_hit_skips_cached_blocks_but_recomputes_last_token():
    sched, pool = make()
    a = req("a", 12)
    sched.add_request(a)
    run_step(sched)
    sched.finish_request(a, RequestStatus.FINISHED_STOPPED)
    b = req("b", 12)  # identical prompt: 3 full blocks cached, only 2 may be reused
    sched.add_request(b)
    out = run_step(sched)
    assert b.num_cached_tokens == 8
    assert out.chunks[0].num_tokens == 4
    c = req("c", 13)  # 3 full blocks reusable, one token left to compute
    sched.add_request(c)
    out = run_step(sched)
    assert c.num_cached_tokens == 12 and out.chunks[-1].num_tokens == 1


def test_preemption_newest_first_and_resume():
    # 5 blocks: two requests of 8 tokens take 2 blocks each, and each needs a 3rd to decode.
    sched, pool = make(num_blocks=5, budget=64, caching=False)
    a, b = req("a", 8, max_tokens=20), req("b", 8, start=50, max_tokens=20)
    sched.add_request(a)
    sched.add_request(b)
    run_step(sched)  # both prefilled: 4 blocks used, 1 output token each (9 tokens)
    assert pool.num_free_blocks == 1
    out = run_step(sched)  # a needs a 3rd block (ok), b needs a 3rd block: none left -> b preempted
    assert [r.request_id for r in out.preempted] == ["b"]
    assert b.status is RequestStatus.WAITING and b.num_computed_tokens == 0 and not b.block_table
    assert sched.waiting[0] is b
    assert [c.request.request_id for c in out.chunks] == ["a"]
    tokens_before = list(b.all_token_ids)
    sched.finish_request(a, RequestStatus.FINISHED_STOPPED)
    out = run_step(sched)  # b resumes: recomputes prompt + its output token
    assert out.chunks[0].request is b and out.chunks[0].num_tokens == len(tokens_before)
    assert b.all_token_ids[: len(tokens_before)] == tokens_before


def test_preempted_request_resumes_before_newer_waiting_ones():
    sched, pool = make(num_blocks=5, budget=64, caching=False)
    a, b = req("a", 8, max_tokens=20), req("b", 8, start=50, max_tokens=20)
    sched.add_request(a)
    sched.add_request(b)
    run_step(sched)
    run_step(sched)  # b preempted
    late = req("late", 4, start=200)
    sched.add_request(late)
    assert list(sched.waiting) == [b, late]


def test_abort_frees_every_block():
    sched, pool = make()
    reqs = [req(str(i), 10, start=20 * i) for i in range(3)]
    for r in reqs:
        sched.add_request(r)
    run_step(sched)
    assert pool.num_free_blocks < pool.num_blocks
    for r in reqs:
        sched.finish_request(r, RequestStatus.FINISHED_ABORTED)
    assert pool.num_free_blocks == pool.num_blocks and pool.usage == 0.0
    assert not sched.running and not sched.waiting


def test_full_blocks_published_after_compute_only():
    sched, pool = make(budget=6)
    r = req("a", 12)
    sched.add_request(r)
    run_step(sched)  # 6 tokens computed: 1 full block
    assert r.num_registered_blocks == 1
    assert len(pool.find_cached_blocks(r.block_hashes)) == 1
    run_step(sched)
    assert r.num_registered_blocks == 3


@pytest.mark.parametrize("budget", [1, 3, 16])
def test_all_requests_finish_under_any_budget(budget):
    sched, pool = make(num_blocks=8, budget=budget, max_seqs=3, caching=True)
    reqs = [req(str(i), 5 + i, start=i, max_tokens=4) for i in range(5)]
    for r in reqs:
        sched.add_request(r)
    for _ in range(400):
        if not sched.has_unfinished:
            break
        run_step(sched)
        for r in list(sched.running):
            if r.num_output_tokens >= 4:
                sched.finish_request(r, RequestStatus.FINISHED_LENGTH)
    assert not sched.has_unfinished
    assert all(r.num_output_tokens == 4 for r in reqs)
    assert pool.num_free_blocks == pool.num_blocks
