"""In-process discovery: a dict behind a lock, with real TTLs (for tests and one-process graphs).

Several :class:`MemoryDiscovery` clients may share one :class:`MemoryStore` (a worker and a
router in the same process); ``make_discovery("memory")`` hands out a process-wide store. Leases
expire on the monotonic clock exactly as they would in etcd, so tests of "a worker whose
heartbeat stops disappears" run against this implementation too.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from tandem.protocols.worker_card import WorkerCard
from tandem.runtime.discovery.base import (
    ChangeWaiter,
    DiscoveryConfig,
    Lease,
    Snapshot,
    SnapshotDiscovery,
    WorkerAlreadyRegisteredError,
)


@dataclass
class _Entry:
    card: WorkerCard
    lease_id: str
    expires_at: float  # time.monotonic()


class MemoryStore:
    """Entries of one in-process registry; thread-safe, shared by any number of clients."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._waiters: set[ChangeWaiter] = set()

    def put(self, card: WorkerCard, lease: Lease) -> None:
        """Insert or refresh ``card`` under ``lease``; a foreign live lease on the id is refused."""
        now = time.monotonic()
        with self._lock:
            self._purge_expired(now)
            current = self._entries.get(card.worker_id)
            if current is not None and current.lease_id != lease.lease_id:
                raise WorkerAlreadyRegisteredError(
                    f"worker_id {card.worker_id!r} is already registered under another live lease"
                )
            self._entries[card.worker_id] = _Entry(card, lease.lease_id, now + lease.ttl_s)
            changed = current is None or current.card != card
        if changed:
            self._notify()

    def delete(self, worker_id: str, lease_id: str) -> None:
        """Remove the entry of ``worker_id`` if ``lease_id`` still owns it."""
        with self._lock:
            current = self._entries.get(worker_id)
            removed = current is not None and current.lease_id == lease_id
            if removed:
                del self._entries[worker_id]
        if removed:
            self._notify()

    def snapshot(self) -> Snapshot:
        """Live entries; expired ones are dropped on the way."""
        with self._lock:
            self._purge_expired(time.monotonic())
            return {wid: (e.lease_id, e.card) for wid, e in self._entries.items()}

    def seconds_to_next_expiry(self) -> float | None:
        """How long until the earliest lease runs out (None when empty)."""
        with self._lock:
            if not self._entries:
                return None
            return min(e.expires_at for e in self._entries.values()) - time.monotonic()

    def add_waiter(self, waiter: ChangeWaiter) -> None:
        with self._lock:
            self._waiters.add(waiter)

    def remove_waiter(self, waiter: ChangeWaiter) -> None:
        with self._lock:
            self._waiters.discard(waiter)

    def _purge_expired(self, now: float) -> None:
        # Caller holds the lock. Watchers find out on their next snapshot (they wake by then:
        # their wait timeout is the time to the next expiry).
        for worker_id in [wid for wid, e in self._entries.items() if e.expires_at <= now]:
            del self._entries[worker_id]

    def _notify(self) -> None:
        with self._lock:
            waiters = list(self._waiters)
        for waiter in waiters:
            waiter.notify()


_shared_stores: dict[str, MemoryStore] = {}
_shared_lock = threading.Lock()


def shared_store(name: str = "default") -> MemoryStore:
    """The process-wide store called ``name`` (created on first use)."""
    with _shared_lock:
        return _shared_stores.setdefault(name, MemoryStore())


class MemoryDiscovery(SnapshotDiscovery):
    """Discovery in this process's memory; ``MemoryDiscovery()`` gets a private store."""

    def __init__(self, store: MemoryStore | None = None, config: DiscoveryConfig | None = None) -> None:
        super().__init__(config)
        self.store = store if store is not None else MemoryStore()

    async def _put(self, card: WorkerCard, lease: Lease) -> None:
        self.store.put(card, lease)

    async def _delete(self, worker_id: str, lease_id: str) -> None:
        self.store.delete(worker_id, lease_id)

    async def _snapshot(self) -> Snapshot:
        return self.store.snapshot()

    def _wait_timeout(self) -> float:
        # Sleep until the next lease could expire (pushes cover every other change).
        next_expiry = self.store.seconds_to_next_expiry()
        if next_expiry is None:
            return self.config.poll_interval_s
        return min(self.config.poll_interval_s, max(0.0, next_expiry) + 0.001)

    def _new_waiter(self) -> ChangeWaiter:
        waiter = super()._new_waiter()
        self.store.add_waiter(waiter)
        return waiter

    def _drop_waiter(self, waiter: ChangeWaiter) -> None:
        super()._drop_waiter(waiter)
        self.store.remove_waiter(waiter)
