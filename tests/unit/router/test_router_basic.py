"""Round-robin and random policies, and the worker pool following discovery."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from tests.support import card, wait_until

from tandem.router.errors import NoWorkerError
from tandem.router.policies.random_choice import RandomPolicy
from tandem.router.policies.round_robin import RoundRobinPolicy
from tandem.router.registry import POLICIES, ROUTER_NAMES, build_policy
from tandem.router.worker_pool import WorkerPool
from tandem.runtime.discovery.memory import MemoryDiscovery


def test_round_robin_cycles_in_order_and_skips_departed_workers():
    policy = RoundRobinPolicy()
    cards = [card("b"), card("a"), card("c")]
    assert [policy.select(cards, []).worker_id for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]
    survivors = [card("a"), card("c")]
    picks = {policy.select(survivors, []).worker_id for _ in range(4)}
    assert picks == {"a", "c"}


def test_round_robin_spreads_interleaved_prefill_and_decode_picks():
    # A disaggregated request picks a prefill worker, then a decode worker: each role must still
    # cycle through all of its workers (one shared counter would always pick p0 here).
    policy = RoundRobinPolicy()
    prefill, decode = [card("p0"), card("p1")], [card("d0"), card("d1")]
    picks = [(policy.select(prefill, []).worker_id, policy.select(decode, []).worker_id) for _ in range(4)]
    assert picks == [("p0", "d0"), ("p1", "d1"), ("p0", "d0"), ("p1", "d1")]


def test_random_is_roughly_uniform_and_seedable():
    cards = [card(x) for x in "abcd"]
    policy = RandomPolicy(seed=1)
    counts = Counter(policy.select(cards, []).worker_id for _ in range(4000))
    assert set(counts) == set("abcd") and all(800 < n < 1200 for n in counts.values())
    first, second = RandomPolicy(seed=5), RandomPolicy(seed=5)
    assert [first.select(cards, []).worker_id for _ in range(8)] == [
        second.select(cards, []).worker_id for _ in range(8)
    ]


def test_unknown_policy_is_a_clear_error():
    with pytest.raises(ValueError, match="round-robin"):
        build_policy("fastest", None, None)  # type: ignore[arg-type]


def test_every_registered_policy_builds_and_has_its_name():
    assert set(POLICIES) | {"remote"} == set(ROUTER_NAMES)
    for name in ("round-robin", "random"):
        policy = build_policy(name, None, None)  # type: ignore[arg-type]
        assert policy.name == name
        assert policy.status([]) == {"policy": name}


def test_worker_pool_follows_discovery_and_blacklists_failures():
    async def scenario():
        discovery = MemoryDiscovery()
        first = await discovery.register(card("a"))
        pool = WorkerPool(discovery, down_for_s=0.2)
        await pool.start()
        try:
            assert [c.worker_id for c in pool.candidates("m")] == ["a"]
            second = await discovery.register(card("b"))
            await wait_until(lambda: len(pool.workers("m")) == 2)
            pool.mark_down("a")
            assert [c.worker_id for c in pool.candidates("m")] == ["b"]
            await asyncio.sleep(0.25)
            assert len(pool.workers("m")) == 2  # back after down_for_s
            await first.withdraw()
            await second.withdraw()
            await wait_until(lambda: not pool.workers())
            with pytest.raises(NoWorkerError, match="'m'"):
                pool.candidates("m")
            with pytest.raises(NoWorkerError):
                pool.candidates("other")
        finally:
            await pool.stop()
            await discovery.close()

    asyncio.run(asyncio.wait_for(scenario(), 10))
