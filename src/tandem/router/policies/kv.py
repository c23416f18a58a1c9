"""The `kv` routing policy: send a request where its prompt's KV blocks already are, without
piling work onto one worker (``router/kv/cost.py``).

For each candidate: cached blocks from the index (``find_matches`` on the router's own sequence
hashes; once a worker reports host or disk tiers, ``find_tiered_matches``, each block credited by
the best tier holding it: ``host_credit``, ``disk_credit``), active prefill tokens and decode
blocks from ``ActiveLoad``; the cost picks the worker (temperature 0: the cheapest, ties at
random). A worker whose card names a node-wide host tier (``kv_node_tier``) joins it in the index
when it appears, so blocks its neighbours put there count for it too.

The index is fed by each worker's KV events (``KvEventFollower`` over ZMQ, or
``NatsKvEventFollower`` for a worker whose card names a NATS subject: one NATS connection per
router, shared by those followers, which also brings the workers' load metrics); with
``use_kv_events=False`` the router indexes its own decisions instead, each entry expiring after
``approx_ttl_s``. The request's load is booked on its worker at routing (its prefill less the
credited blocks), its prefill released at the first token, the rest at the end.

Visible health: per worker, batches received, last seq, blocks indexed (per tier), gaps
recovered and dumps, and (NATS) its latest load metrics; the router's hit rate (device-tier
cached blocks ÷ prompt blocks of routed requests), the host and disk blocks its choices matched,
and its per-request overhead. A worker that has served requests but never published an event
gets one warning in the log and ``events_missing`` in the status.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from tandem.protocols.worker_card import WorkerCard
from tandem.router.kv.active_load import ActiveLoad
from tandem.router.kv.approx_index import ApproxIndex
from tandem.router.kv.cost import (
    DEFAULT_PREFILL_LOAD_SCALE,
    KvCostConfig,
    check_weight,
    select_worker,
    tier_credits,
    worker_costs,
)
from tandem.router.kv.follower_core import KvEventFollowerCore
from tandem.router.kv.indexer import KvIndexer
from tandem.router.kv.tiers import Tier, TieredMatch
from tandem.router.kv.zmq_follower import KvEventFollower
from tandem.router.policy import RoutingPolicy
from tandem.runtime.background import spawn
from tandem.runtime.request_plane import RequestPlaneClient

if TYPE_CHECKING:  # imported when the first NATS worker appears (nats-py is loaded only then)
    from tandem.runtime.event_plane.nats_router_plane import NatsRouterPlane
    from tandem.runtime.event_plane.replica_sync import ReplicaSync

logger = logging.getLogger(__name__)

WARN_AFTER_REQUESTS = 2
"""A worker that finished this many routed requests without one KV event gets the warning."""


@dataclass
class KvRouterConfig:
    overlap_credit: float = 1.0
    """Weight of a cached block against a prefill block (0 ignores the cache: load only)."""
    prefill_load_scale: float = DEFAULT_PREFILL_LOAD_SCALE
    """Weight of prefill work against decode blocks (Dynamo's default: 1.0)."""
    host_credit: float = 0.75
    """Weight of a cached block found only in a worker's host memory tier (G2) against one in its
    pool (Dynamo's default)."""
    disk_credit: float = 0.25
    """Weight of a cached block found only in a worker's disk tier (G3) (Dynamo's default)."""
    temperature: float = 0.0
    """0: always the cheapest worker; > 0: softmax sampling over normalised costs."""
    use_kv_events: bool = True
    """Index the workers' KV events; False: index the router's own decisions (approximate)."""
    approx_ttl_s: float = 120.0
    """Without events: how long a routed prompt's blocks count as cached on its worker."""
    block_size: int = 16
    """Tokens per block when no worker card says otherwise."""
    seed: int | None = None
    nats_url: str | None = None
    """NATS server(s) for workers that publish KV events on NATS (``--event-plane nats``); None:
    the server named in the first such worker's card."""
    replica_sync: bool = True
    """With NATS workers: share this router's load bookings with the other routers of their
    namespace and book theirs here (router/replica_sync.py), so replicas cost workers alike."""

    def __post_init__(self) -> None:
        for name in ("host_credit", "disk_credit"):
            check_weight(name, getattr(self, name))


class WorkerEvents(Protocol):
    """What ``KvRouter`` needs of its workers' source (a ``WorkerPool``): hearing of each worker
    that appears (those already known included) or leaves."""

    def add_listener(
        self, on_added: Callable[[WorkerCard], None], on_removed: Callable[[WorkerCard], None]
    ) -> None: ...


class KvRouter(RoutingPolicy):
    name = "kv"

    def __init__(self, pool: WorkerEvents, client: RequestPlaneClient, config: KvRouterConfig | None = None) -> None:
        self.config = config or KvRouterConfig()
        self.cost = KvCostConfig(
            overlap_credit=self.config.overlap_credit,
            prefill_load_scale=self.config.prefill_load_scale,
            host_credit=self.config.host_credit,
            disk_credit=self.config.disk_credit,
            temperature=self.config.temperature,
            seed=self.config.seed,
        )
        self._rng = self.cost.make_rng()
        self.client = client
        self.block_size = self.config.block_size
        self.indexer = KvIndexer(self.block_size)
        self.approx = ApproxIndex(self.config.approx_ttl_s)
        self.load = ActiveLoad(self.block_size)
        self.followers: dict[str, KvEventFollowerCore] = {}
        self.nats: NatsRouterPlane | None = None  # made for the first worker that publishes on NATS
        self.sync: ReplicaSync | None = None  # on that plane (KvRouterConfig.replica_sync)
        self.routed: dict[str, int] = {}  # worker → requests finished
        self._warned: set[str] = set()
        self.requests_routed = 0
        self.prompt_blocks = 0
        self.cached_blocks = 0  # device-tier blocks matched by the chosen workers
        self.host_matched_blocks = 0  # blocks they matched best in host memory (G2)
        self.disk_matched_blocks = 0  # ... and on disk (G3)
        self._node_tiers: dict[str, str] = {}  # worker → its card's kv_node_tier
        self.overhead_s_total = 0.0
        pool.add_listener(self._on_added, self._on_removed)

    # --- workers ---

    def _on_added(self, card: WorkerCard) -> None:
        if card.block_size != self.block_size and not self.followers:
            self.block_size = card.block_size
            self.indexer, self.load = KvIndexer(card.block_size), ActiveLoad(card.block_size)
            for worker, node_tier in self._node_tiers.items():
                self.indexer.set_node_tier(worker, node_tier)
        if card.kv_node_tier is not None:
            self._node_tiers[card.worker_id] = card.kv_node_tier
            self.indexer.set_node_tier(card.worker_id, card.kv_node_tier)
        if card.worker_id in self.followers or not self.config.use_kv_events or not card.kv_events_address:
            return
        follower = self._make_follower(card)
        follower.start()
        self.followers[card.worker_id] = follower

    def _make_follower(self, card: WorkerCard) -> KvEventFollowerCore:
        if card.kv_events_subject is None:
            return KvEventFollower(card, self.indexer, self.client)
        from tandem.router.kv.nats_follower import NatsKvEventFollower
        from tandem.runtime.event_plane.nats_router_plane import NatsRouterPlane

        if self.nats is None:
            assert card.kv_events_address is not None  # the card's validation guarantees it
            self.nats = NatsRouterPlane(self.config.nats_url or card.kv_events_address)
        follower = NatsKvEventFollower(card, self.indexer, self.client, self.nats)
        if self.sync is None and self.config.replica_sync:
            from tandem.runtime.event_plane.replica_sync import ReplicaSync

            self.sync = ReplicaSync(self.nats, follower.namespace, lambda: self.load)
            spawn(self.sync.start())
        return follower

    def _on_removed(self, card: WorkerCard) -> None:
        if self.nats is not None:
            self.nats.forget(card.worker_id)
        follower = self.followers.pop(card.worker_id, None)
        if follower is not None:
            spawn(follower.stop())
        self._node_tiers.pop(card.worker_id, None)
        self.indexer.remove_worker(card.worker_id)
        self.approx.remove_worker(card.worker_id)
        self.load.remove_worker(card.worker_id)

    async def stop(self) -> None:
        for follower in list(self.followers.values()):
            await follower.stop()
        self.followers.clear()
        if self.sync is not None:
            await self.sync.stop()
        if self.nats is not None:
            await self.nats.close()

    # --- routing ---

    def select(self, candidates: list[WorkerCard], token_ids: list[int]) -> WorkerCard:
        return self.route(candidates, token_ids, None, None)

    def route(
        self, candidates: list[WorkerCard], token_ids: list[int], request_id: str | None, cache_salt: str | None
    ) -> WorkerCard:
        """Pick the cheapest candidate for this prompt and book the request's load on it."""
        start = time.perf_counter()
        hashes = self.indexer.sequence_hashes(token_ids, cache_salt)
        now = time.monotonic()
        tiered: dict[str, TieredMatch] | None = None
        matches: Mapping[str, float]
        if not self.config.use_kv_events:
            matches = self.approx.find_matches(hashes, now)
        elif self.indexer.has_lower_tiers():
            tiered = self.indexer.find_tiered_matches(hashes)
            matches = tier_credits(tiered, self.cost)
        else:
            matches = self.indexer.find_matches(hashes)  # device blocks only: no credit to weigh
        loads = self.load.loads([c.worker_id for c in candidates])
        costs = worker_costs(loads, len(token_ids), matches, self.block_size, self.cost)
        chosen = select_worker(costs, self.cost.temperature, self._rng)
        credit = matches.get(chosen, 0)
        # The prefill booked spares the credited blocks, as the cost assumed.
        cached_tokens = min(len(token_ids), int(credit * self.block_size))
        if request_id is not None:
            self.load.add_request(request_id, chosen, hashes, len(token_ids), cached_tokens)
            if self.sync is not None:
                self.sync.add(request_id, chosen, hashes, len(token_ids), cached_tokens)
        if not self.config.use_kv_events:
            self.approx.record(chosen, hashes, now)
        self._count_hits(len(hashes), credit, tiered.get(chosen) if tiered is not None else None)
        self.overhead_s_total += time.perf_counter() - start
        return next(c for c in candidates if c.worker_id == chosen)

    def _count_hits(self, prompt_blocks: int, cached: float, match: TieredMatch | None) -> None:
        self.requests_routed += 1
        self.prompt_blocks += prompt_blocks
        if match is None:
            self.cached_blocks += int(cached)  # device blocks (or none) when no tier is indexed
            return
        self.cached_blocks += match.device
        self.host_matched_blocks += match.host
        self.disk_matched_blocks += match.disk

    def on_first_token(self, request_id: str) -> None:
        self.load.mark_prefill_done(request_id)
        if self.sync is not None:
            self.sync.prefill_done(request_id)

    def on_finished(self, request_id: str) -> None:
        worker = self.load.worker_of(request_id)
        self.load.free(request_id)
        if self.sync is not None and worker is not None:
            self.sync.free(request_id)
        if worker is None:
            return
        self.routed[worker] = self.routed.get(worker, 0) + 1
        if self.config.use_kv_events and worker not in self._warned and self._events_missing(worker):
            self._warned.add(worker)
            logger.warning(
                "KV routing is on but worker %s has published no KV events after serving %d requests: "
                "its cache is invisible to the router (start it without --no-kv-events)",
                worker,
                self.routed[worker],
            )

    def _events_missing(self, worker: str) -> bool:
        if self.routed.get(worker, 0) < WARN_AFTER_REQUESTS:
            return False
        follower = self.followers.get(worker)
        return follower is None or (follower.stats.last_seq < 0 and follower.stats.batches_received == 0)

    # --- status ---

    @property
    def hit_rate(self) -> float:
        return self.cached_blocks / self.prompt_blocks if self.prompt_blocks else 0.0

    def status(self, cards: list[WorkerCard]) -> dict[str, Any]:
        workers = {}
        for card in cards:
            follower = self.followers.get(card.worker_id)
            stats = follower.stats if follower else None
            workers[card.worker_id] = {
                "model": card.model,
                "kv_events_address": card.kv_events_address,
                "events_received": stats.batches_received if stats else 0,
                "last_seq": stats.last_seq if stats else None,
                "gaps_recovered": stats.gaps_recovered if stats else 0,
                "dumps": stats.dumps if stats else 0,
                "serves_kv_dump": card.serves_kv_dump,
                "index_rebuilds": stats.rebuilds if stats else 0,
                "event_transport": follower.transport if follower else None,
                "malformed_events": stats.malformed if stats else 0,
                "load": self.nats.load_of(card.worker_id) if self.nats is not None else None,
                "blocks_indexed": self.indexer.blocks_of(card.worker_id),
                "blocks_by_tier": {tier.name.lower(): self.indexer.blocks_of(card.worker_id, tier) for tier in Tier},
                "kv_node_tier": card.kv_node_tier,
                "requests_finished": self.routed.get(card.worker_id, 0),
                "events_missing": self.config.use_kv_events and self._events_missing(card.worker_id),
                "active_prefill_tokens": self.load.prefill_tokens(card.worker_id),
                "active_decode_blocks": self.load.decode_blocks(card.worker_id),
            }
        return {
            "policy": self.name,
            "use_kv_events": self.config.use_kv_events,
            "block_size": self.block_size,
            "overlap_credit": self.cost.overlap_credit,
            "prefill_load_scale": self.cost.prefill_load_scale,
            "host_credit": self.cost.host_credit,
            "disk_credit": self.cost.disk_credit,
            "temperature": self.cost.temperature,
            "requests_routed": self.requests_routed,
            "hit_rate": self.hit_rate,
            "prompt_blocks": self.prompt_blocks,
            "cached_blocks": self.cached_blocks,
            "host_matched_blocks": self.host_matched_blocks,
            "disk_matched_blocks": self.disk_matched_blocks,
            "overhead_ms_mean": 1e3 * self.overhead_s_total / self.requests_routed if self.requests_routed else 0.0,
            "workers": workers,
            "nats": self._nats_status(),
        }

    def _nats_status(self) -> dict[str, Any] | None:
        if self.nats is None:
            return None
        status: dict[str, Any] = {"url": self.nats.url, "load_malformed": self.nats.load_malformed}
        if self.sync is not None:
            status.update(
                router_id=self.sync.router_id,
                bookings_applied=self.sync.applied,
                bookings_malformed=self.sync.malformed,
            )
        return status
