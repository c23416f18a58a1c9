"""etcd discovery: worker cards as JSON under ``/tandem/{namespace}/workers/{id}``, on one lease per process.

A client (aetcd: asyncio-native etcd v3 gRPC) registers cards in a transaction that refuses a
worker id held by another live lease, keeps its lease alive, re-registers everything after an
outage (a new lease if the old one expired), and fails over across endpoints. ``watch()`` lists,
then follows a leader-requiring etcd watch; across an outage it keeps the set it announced and
emits only real differences afterwards. Why aetcd, and every rule in detail: docs/discovery-etcd.md.

:class:`EtcdDiscovery` composes three modules beside this one: ``etcd_client`` (the connection,
endpoint failover, ``_LeaderAwareClient``), ``etcd_lease`` (grant, keep-alive, re-registration)
and ``etcd_watch`` (list, then watch, across outages).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from tandem.protocols.worker_card import WorkerCard
from tandem.runtime.discovery.base import (
    Discovery,
    DiscoveryClosedError,
    DiscoveryConfig,
    DiscoveryEvent,
    Registration,
)
from tandem.runtime.discovery.etcd_client import (
    RPC_TIMEOUT_S,
    DiscoveryUnavailableError,
    EtcdConnection,
    _LeaderAwareClient,
    parse_endpoints,
)
from tandem.runtime.discovery.etcd_lease import LeaseKeeper
from tandem.runtime.discovery.etcd_watch import PrefixWatcher

__all__ = [
    "RPC_TIMEOUT_S",
    "DiscoveryUnavailableError",
    "EtcdDiscovery",
    "_LeaderAwareClient",
    "parse_endpoints",
]


class EtcdDiscovery(Discovery):
    """Discovery in etcd at ``endpoints`` (``"host:port[,host:port]"``), keys scoped by ``namespace``.

    Constructing connects to nothing; the first call does.
    """

    def __init__(self, endpoints: str, *, namespace: str = "tandem", config: DiscoveryConfig | None = None) -> None:
        if not namespace or "/" in namespace:
            raise ValueError(f"namespace must be non-empty and without '/', got {namespace!r}")
        self.endpoints = parse_endpoints(endpoints)
        self.namespace = namespace
        self.config = config or DiscoveryConfig()
        self.prefix = f"/tandem/{namespace}/workers/".encode()
        self._conn = EtcdConnection(self.endpoints)
        self._leases = LeaseKeeper(self._conn, self.key, self.config)
        self._watcher = PrefixWatcher(self._conn, self.prefix, grace_s=self.config.ttl_s)

    @property
    def _closed(self) -> bool:
        """close() has begun (``Discovery._registration_ttl`` refuses new registrations then)."""
        return self._conn.closed

    def key(self, worker_id: str) -> bytes:
        """The etcd key of ``worker_id``."""
        return self.prefix + worker_id.encode()

    async def register(self, card: WorkerCard, ttl_s: float | None = None) -> Registration:
        return await self._leases.register(card, self._registration_ttl(ttl_s))

    async def list(self, model: str | None = None) -> list[WorkerCard]:
        """Live cards from etcd; raises DiscoveryUnavailableError when no endpoint answers."""
        if self._closed:
            raise DiscoveryClosedError("discovery is closed")
        cards, _ = await self._conn.call_any(self._watcher.read)
        return sorted((c for c in cards.values() if model is None or c.model == model), key=lambda c: c.worker_id)

    def watch(self) -> AsyncIterator[DiscoveryEvent]:
        return self._watcher.watch()

    async def close(self) -> None:
        """Withdraw this client's registrations (by revoking its lease), end its watchers and
        close the connection. Idempotent."""
        if self._closed:
            return
        self._conn.begin_close()
        self._leases.wake()
        self._watcher.end_all()
        await self._leases.close()
        await self._conn.shut()
