"""KvRouter's decisions without a network: the approximate index (no events), load booking,
the cost with cached blocks, and the status it reports."""

from __future__ import annotations

import random

from tandem.protocols.block_hash import block_hashes
from tandem.protocols.kv_events import BlockStored
from tandem.protocols.worker_card import WorkerCard
from tandem.router.policies.kv import KvRouter, KvRouterConfig
from tandem.router.worker_pool import WorkerPool
from tandem.runtime.discovery.memory import MemoryDiscovery
from tandem.runtime.request_plane import RequestPlaneClient

CARDS = [
    WorkerCard(
        worker_id=f"w{i}",
        model="m",
        tokenizer="m",
        chat_template="m",
        context_length=8192,
        block_size=16,
        total_kv_blocks=1024,
        request_plane_address=f"127.0.0.1:{1000 + i}",
    )
    for i in range(4)
]


def _router(**config) -> KvRouter:
    return KvRouter(WorkerPool(MemoryDiscovery()), RequestPlaneClient(), KvRouterConfig(seed=0, **config))


def _prompt(seed: int, n: int = 160) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000, 30000) for _ in range(n)]


def test_without_events_a_repeat_follows_the_routers_own_earlier_decision():
    router = _router(use_kv_events=False)
    for seed in range(10):
        prompt = _prompt(seed)
        first = router.route(CARDS, prompt, f"a{seed}", None)
        router.on_first_token(f"a{seed}")
        router.on_finished(f"a{seed}")
        again = router.route(CARDS, prompt, f"b{seed}", None)
        router.on_finished(f"b{seed}")
        assert again.worker_id == first.worker_id
    assert router.hit_rate == 0.5  # every second request found all of its 10 blocks


def test_without_events_entries_expire_after_the_ttl():
    router = _router(use_kv_events=False, approx_ttl_s=0.0)
    prompt = _prompt(1)
    router.route(CARDS, prompt, "a", None)
    router.on_finished("a")
    router.route(CARDS, prompt, "b", None)
    assert router.cached_blocks == 0


def test_with_events_the_cached_worker_wins_unless_it_is_loaded():
    router = _router()
    prompt = _prompt(7)
    hashes = block_hashes(prompt, 16)
    router.indexer.apply(
        "w2", BlockStored(block_hashes=hashes, parent_block_hash=None, token_ids=prompt, block_size=16)
    )
    assert router.route(CARDS, prompt, "r1", None).worker_id == "w2"
    router.on_finished("r1")
    # Pile unrelated prefill onto w2: 10 cached blocks no longer pay for 40 blocks of queued work.
    for i in range(4):
        router.load.add_request(f"busy{i}", "w2", [], 160)
    assert router.route(CARDS, prompt, "r2", None).worker_id != "w2"


def test_booked_load_spreads_new_prompts_and_is_released():
    router = _router()
    chosen = [router.route(CARDS, _prompt(100 + i), f"r{i}", None).worker_id for i in range(4)]
    assert sorted(chosen) == ["w0", "w1", "w2", "w3"]  # each booking makes its worker costlier
    for i in range(4):
        router.on_first_token(f"r{i}")
        router.on_finished(f"r{i}")
    assert all(
        router.load.prefill_tokens(c.worker_id) == 0 and router.load.decode_blocks(c.worker_id) == 0 for c in CARDS
    )


def test_status_reports_workers_hit_rate_and_overhead():
    router = _router()
    router.route(CARDS, _prompt(3), "r", None)
    status = router.status(CARDS)
    assert status["policy"] == "kv" and status["requests_routed"] == 1 and status["overhead_ms_mean"] > 0
    assert set(status["workers"]) == {c.worker_id for c in CARDS}
    assert all(w["events_missing"] is False for w in status["workers"].values())
