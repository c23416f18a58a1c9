"""Active-load tracking per worker and the least-loaded policy."""

from __future__ import annotations

import functools
import random
from collections import Counter

import pytest
from tests.support import card as make_card

from tandem.router.kv.active_load import ActiveLoad
from tandem.router.policies.least_loaded import LeastLoadedPolicy

BS = 4
card = functools.partial(make_card, block_size=BS)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def state(load: ActiveLoad, worker: str) -> tuple[int, int, int]:
    return load.prefill_tokens(worker), load.decode_blocks(worker), load.active_requests(worker)


def test_booking_and_releasing():
    load = ActiveLoad(BS)
    # 10 tokens = 2 full blocks (hashed) + a partial block; 4 tokens cached -> 6 to prefill.
    load.add_request("r1", "w1", [11, 12], num_prompt_tokens=10, num_cached_tokens=4)
    assert state(load, "w1") == (6, 3, 1)
    assert state(load, "w2") == (0, 0, 0)
    assert load.worker_of("r1") == "w1" and "r1" in load and len(load) == 1
    load.add_request("r2", "w2", [21, 22, 23], num_prompt_tokens=12, num_cached_tokens=0)
    assert state(load, "w2") == (12, 3, 1)
    assert load.snapshot() == {
        "w1": {"prefill_tokens": 6, "decode_blocks": 3, "active_requests": 1},
        "w2": {"prefill_tokens": 12, "decode_blocks": 3, "active_requests": 1},
    }
    load.free("r1")
    assert state(load, "w1") == (0, 0, 0)
    assert load.workers() == ["w2"]
    load.free("r2")
    assert load.workers() == [] and len(load) == 0 and load.snapshot() == {}


def test_cached_tokens_beyond_the_prompt_do_not_go_negative():
    load = ActiveLoad(BS)
    load.add_request("r", "w", [1, 2], num_prompt_tokens=8, num_cached_tokens=20)
    assert state(load, "w") == (0, 2, 1)


def test_shared_prefixes_count_once_per_worker():
    load = ActiveLoad(BS)
    # Two requests on w1 share their first two blocks; each has its own partial tail block.
    load.add_request("a", "w1", [1, 2, 3], num_prompt_tokens=13, num_cached_tokens=0)
    load.add_request("b", "w1", [1, 2, 4], num_prompt_tokens=14, num_cached_tokens=8)
    assert load.decode_blocks("w1") == 3 + 1 + 1 + 1  # {1,2,3,4} + two private tails
    assert load.prefill_tokens("w1") == 13 + 6
    # The same prefix on another worker is counted there too (blocks live per worker).
    load.add_request("c", "w2", [1, 2], num_prompt_tokens=8, num_cached_tokens=0)
    assert load.decode_blocks("w2") == 2
    assert load.decode_blocks("w1") == 6
    # Freeing one sharer keeps the shared blocks booked for the other.
    load.free("a")
    assert load.decode_blocks("w1") == 3 + 1  # {1,2,4} + b's tail
    load.free("b")
    assert load.decode_blocks("w1") == 0
    assert load.decode_blocks("w2") == 2


def test_requests_without_hashes_count_their_blocks_privately():
    load = ActiveLoad(BS)
    load.add_request("a", "w", [], num_prompt_tokens=9, num_cached_tokens=0)
    load.add_request("b", "w", [], num_prompt_tokens=9, num_cached_tokens=0)
    assert load.decode_blocks("w") == 3 + 3
    # A hash listed twice is one block.
    load.add_request("c", "x", [7, 7], num_prompt_tokens=8)
    assert load.decode_blocks("x") == 1 + 1


def test_mark_prefill_done_releases_only_prefill():
    load = ActiveLoad(BS)
    load.add_request("r", "w", [1, 2], num_prompt_tokens=8, num_cached_tokens=0)
    load.add_request("s", "w", [1, 3], num_prompt_tokens=8, num_cached_tokens=4)
    assert state(load, "w") == (12, 3, 2)
    load.mark_prefill_done("r")
    assert state(load, "w") == (4, 3, 2)
    load.mark_prefill_done("r")  # idempotent
    load.mark_prefill_done("nope")  # unknown: ignored
    assert state(load, "w") == (4, 3, 2)
    load.free("r")
    assert state(load, "w") == (4, 2, 1)


def test_free_is_idempotent_and_unknown_ids_are_ignored():
    load = ActiveLoad(BS)
    load.add_request("r", "w", [1], num_prompt_tokens=4, num_cached_tokens=0)
    load.add_request("s", "w", [1], num_prompt_tokens=4, num_cached_tokens=0)
    load.free("r")
    load.free("r")
    load.free("never-booked")
    assert state(load, "w") == (4, 1, 1)
    load.mark_prefill_done("s")
    load.free("s")
    load.free("s")
    assert state(load, "w") == (0, 0, 0)


def test_rebooking_an_id_replaces_the_old_booking():
    load = ActiveLoad(BS)
    load.add_request("r", "w1", [1, 2], num_prompt_tokens=8)
    load.add_request("r", "w2", [1], num_prompt_tokens=4)  # e.g. a retry on another worker
    assert state(load, "w1") == (0, 0, 0)
    assert state(load, "w2") == (4, 1, 1)


def test_stale_entries_expire_with_a_fake_clock():
    clock = FakeClock()
    load = ActiveLoad(BS, expiry_s=300, clock=clock)
    load.add_request("old", "w", [1, 2], num_prompt_tokens=8)
    clock.now += 200
    load.add_request("new", "w", [1, 3], num_prompt_tokens=8)
    assert state(load, "w") == (16, 3, 2)
    clock.now += 99
    assert state(load, "w") == (16, 3, 2)  # old is 299 s old: still there
    clock.now += 2
    assert state(load, "w") == (8, 2, 1)  # old expired, its blocks released; shared block 1 stays
    assert "old" not in load and load.expired_total == 1
    load.free("old")  # a late release of an expired request is harmless
    assert state(load, "w") == (8, 2, 1)
    clock.now += 300
    assert state(load, "w") == (0, 0, 0)
    assert load.expired_total == 2


def test_mark_prefill_done_refreshes_the_expiry():
    clock = FakeClock()
    load = ActiveLoad(BS, expiry_s=10, clock=clock)
    load.add_request("a", "w", [1], num_prompt_tokens=4)
    load.add_request("b", "w", [2], num_prompt_tokens=4)
    clock.now += 8
    load.mark_prefill_done("a")  # a is now younger than b
    clock.now += 5
    assert load.expire() == ["b"]
    assert load.active_requests("w") == 1 and "a" in load
    clock.now += 6
    assert load.expire() == ["a"]


def test_remove_worker_drops_its_requests():
    load = ActiveLoad(BS)
    load.add_request("r1", "w1", [1], num_prompt_tokens=4)
    load.add_request("r2", "w1", [2], num_prompt_tokens=4)
    load.add_request("r3", "w2", [1], num_prompt_tokens=4)
    load.remove_worker("w1")
    assert state(load, "w1") == (0, 0, 0)
    assert state(load, "w2") == (4, 1, 1)
    assert "r1" not in load and "r2" not in load and len(load) == 1
    load.free("r1")  # releases after the worker left are harmless
    load.mark_prefill_done("r2")
    load.remove_worker("never-seen")
    assert load.workers() == ["w2"]


def test_constructor_validation():
    with pytest.raises(ValueError):
        ActiveLoad(0)
    with pytest.raises(ValueError):
        ActiveLoad(16, expiry_s=0)


def test_least_loaded_picks_the_least_loaded():
    load = ActiveLoad(BS)
    policy = LeastLoadedPolicy(load, seed=0)
    cards = [card("a"), card("b"), card("c")]
    load.add_request("r1", "a", [1, 2], num_prompt_tokens=8)  # 2 prefill blocks + 2 decode = 4
    load.add_request("r2", "b", [1], num_prompt_tokens=4)  # 1 + 1 = 2
    load.add_request("r3", "c", [1, 2, 3], num_prompt_tokens=12, num_cached_tokens=12)  # 0 + 3 = 3
    assert policy.load("a") == 4 and policy.load("b") == 2 and policy.load("c") == 3
    assert policy.select(cards, [1, 2, 3]).worker_id == "b"
    load.mark_prefill_done("r1")  # a: 0 + 2 = 2; tied with b
    picks = Counter(policy.select(cards, []).worker_id for _ in range(300))
    assert set(picks) == {"a", "b"} and min(picks.values()) > 90
    load.free("r1")
    assert policy.select(cards, []).worker_id == "a"
    # Only the candidates count: a busy worker that is the sole candidate is still chosen.
    assert policy.select([card("c")], []).worker_id == "c"
    assert policy.name == "least-loaded"


def test_least_loaded_spreads_requests_when_booked():
    load = ActiveLoad(BS)
    policy = LeastLoadedPolicy(load, seed=1)
    cards = [card(w) for w in "abcd"]
    rng = random.Random(2)
    for i in range(40):
        tokens = [rng.randrange(1000) for _ in range(8)]
        chosen = policy.select(cards, tokens)
        load.add_request(f"r{i}", chosen.worker_id, [i * 10, i * 10 + 1], num_prompt_tokens=8)
    assert [load.active_requests(w) for w in "abcd"] == [10, 10, 10, 10]


def test_least_loaded_is_seedable():
    cards = [card(w) for w in "abcd"]
    first, second = LeastLoadedPolicy(ActiveLoad(BS), seed=9), LeastLoadedPolicy(ActiveLoad(BS), seed=9)
    assert [first.select(cards, []).worker_id for _ in range(10)] == [
        second.select(cards, []).worker_id for _ in range(10)
    ]
    with pytest.raises(ValueError):
        first.select([], [])
