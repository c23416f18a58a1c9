"""Discovery: where the workers are and what they serve (DESIGN §3 runtime).

A worker registers its :class:`WorkerCard` under a lease with a TTL; a heartbeat task keeps the
lease alive until the worker withdraws. A worker that dies without withdrawing (SIGKILL, power
loss) disappears once its TTL runs out. Routers and frontends ``list()`` the live cards or
``watch()`` a stream of Added/Removed events.

Implementations: ``memory`` (:mod:`tandem.runtime.discovery.memory`, tests and single-process
graphs), ``file`` (:mod:`tandem.runtime.discovery.file`, the default on one machine) and ``etcd``
(:mod:`tandem.runtime.discovery.etcd`, clusters). :func:`make_discovery` builds one from a spec string.
"""

from __future__ import annotations

import abc
import asyncio
import enum
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from tandem.protocols.worker_card import WorkerCard
from tandem.runtime.backoff import Backoff

log = logging.getLogger(__name__)


@dataclass
class DiscoveryConfig:
    """Timing of leases, heartbeats and polling, shared by every implementation."""

    ttl_s: float = 10.0
    """Lease TTL when ``register`` gets none: a dead worker vanishes after at most this long
    (10 s, like Dynamo's etcd lease)."""
    heartbeat_fraction: float = 1 / 3
    """The heartbeat refreshes a lease every ``ttl_s * heartbeat_fraction`` seconds."""
    poll_interval_s: float = 0.5
    """How often ``watch`` re-reads state that cannot push changes (the file directory)."""

    def __post_init__(self) -> None:
        if self.ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {self.ttl_s}")
        if not 0 < self.heartbeat_fraction < 1:
            raise ValueError(f"heartbeat_fraction must be in (0, 1), got {self.heartbeat_fraction}")
        if self.poll_interval_s <= 0:
            raise ValueError(f"poll_interval_s must be positive, got {self.poll_interval_s}")


class WorkerAlreadyRegisteredError(RuntimeError):
    """Another live lease already holds this worker_id."""


class DiscoveryClosedError(RuntimeError):
    """The discovery client was closed."""


class EventKind(enum.StrEnum):
    """What happened to a worker."""

    ADDED = "added"
    REMOVED = "removed"


@dataclass(frozen=True)
class DiscoveryEvent:
    """A worker appeared (``ADDED``) or went away (``REMOVED``: withdrawn or lease expired)."""

    kind: EventKind
    card: WorkerCard


@dataclass(frozen=True)
class Lease:
    """The lease discovery attached to a registration."""

    lease_id: str
    """Unique per registration: a re-registered worker_id gets a new one."""
    ttl_s: float
    """Seconds the entry stays alive without a heartbeat."""


class Registration:
    """A live registration: heartbeats its lease until :meth:`withdraw` (or :meth:`abandon`)."""

    def __init__(
        self,
        card: WorkerCard,
        lease: Lease,
        heartbeat_interval_s: float,
        refresh: Callable[[], Awaitable[None]],
        remove: Callable[[], Awaitable[None]],
    ) -> None:
        self.card = card
        self.lease = lease
        self.heartbeat_interval_s = heartbeat_interval_s
        self._refresh = refresh
        self._remove = remove
        self._withdrawn = False
        self._task: asyncio.Task[None] | None = asyncio.get_running_loop().create_task(
            self._heartbeat(), name=f"discovery-heartbeat-{card.worker_id}"
        )

    @property
    def active(self) -> bool:
        """True while the heartbeat runs."""
        return self._task is not None and not self._task.done()

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval_s)
            try:
                await self._refresh()
            except Exception as exc:  # keep trying: a transient error must not drop the worker
                log.warning("discovery heartbeat of %s failed: %s", self.card.worker_id, exc)

    def abandon(self) -> None:
        """Stop heartbeating but leave the entry: it expires after its TTL, as after a crash."""
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def withdraw(self) -> None:
        """Stop heartbeating and remove the entry now. Idempotent."""
        if self._withdrawn:
            return
        self._withdrawn = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self._remove()

    async def __aenter__(self) -> Registration:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.withdraw()


class Discovery(abc.ABC):
    """Where the workers are: register cards under leases, list them, watch changes."""

    config: DiscoveryConfig  # every implementation sets it in __init__

    @abc.abstractmethod
    async def register(self, card: WorkerCard, ttl_s: float | None = None) -> Registration:
        """Publish ``card`` under a new lease (TTL ``ttl_s``, default from the config) and keep it
        alive by heartbeat. Raises :class:`WorkerAlreadyRegisteredError` if another live lease
        holds ``card.worker_id``."""

    @abc.abstractmethod
    async def list(self, model: str | None = None) -> list[WorkerCard]:
        """Live cards (expired leases left out), sorted by worker_id; only ``model``'s if given."""

    @abc.abstractmethod
    def watch(self) -> AsyncIterator[DiscoveryEvent]:
        """Events from now on; the current set first arrives as ADDED. Ends when closed."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Withdraw this client's registrations and end its watchers. Idempotent."""

    def _registration_ttl(self, ttl_s: float | None) -> float:
        """The TTL a new registration gets (``ttl_s`` or the config's); refuses a closed client or a
        TTL that is not positive."""
        # `_closed` is an attribute in the polling backends and a property in etcd's: not declared
        # here, so that either may define it.
        if self._closed:  # type: ignore[attr-defined]
            raise DiscoveryClosedError("discovery is closed")
        ttl = self.config.ttl_s if ttl_s is None else ttl_s
        if ttl <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl}")
        return ttl

    async def __aenter__(self) -> Discovery:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


async def register_when_reachable(
    discovery: Discovery, card: WorkerCard, ttl_s: float | None = None, wait_s: float = 0.0
) -> Registration:
    """``discovery.register``, retried with backoff while discovery is unreachable (a
    ``ConnectionError``, e.g. etcd not up yet) for up to ``wait_s`` seconds; then the last error
    is raised. Other errors (a duplicate worker_id) are raised at once."""
    deadline = time.monotonic() + wait_s
    backoff = Backoff()
    waiting_since: float | None = None
    while True:
        try:
            registration = await discovery.register(card, ttl_s)
        except ConnectionError as exc:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise
            if waiting_since is None:
                waiting_since = time.monotonic()
                log.warning(
                    "worker %s: discovery unreachable (%s); retrying for up to %.0fs", card.worker_id, exc, remaining
                )
            await asyncio.sleep(min(backoff.next(), remaining))
            continue
        if waiting_since is not None:
            log.info(
                "worker %s: registered after waiting %.1fs for discovery",
                card.worker_id,
                time.monotonic() - waiting_since,
            )
        return registration


# worker_id -> (lease_id, card): what a SnapshotDiscovery sees at one instant.
Snapshot = dict[str, tuple[str, WorkerCard]]


class ChangeWaiter:
    """Wakes one watcher when something may have changed; safe to notify from any thread."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._event = asyncio.Event()

    def notify(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._event.set)
        except RuntimeError:  # the watcher's loop is closed: nobody left to wake
            pass

    async def wait(self, timeout_s: float) -> None:
        """Return after a notify (since the last wait) or after ``timeout_s``."""
        try:
            await asyncio.wait_for(self._event.wait(), timeout=max(0.0, timeout_s))
        except TimeoutError:
            pass
        self._event.clear()


class SnapshotDiscovery(Discovery):
    """Shared machinery: leases with heartbeats, and ``watch`` as a diff of successive snapshots.

    Subclasses store entries (:meth:`_put`, :meth:`_delete`), read live ones (:meth:`_snapshot`)
    and say how long a watcher may sleep before looking again (:meth:`_wait_timeout`).
    """

    def __init__(self, config: DiscoveryConfig | None = None) -> None:
        self.config = config or DiscoveryConfig()
        self._closed = False
        self._registrations: set[Registration] = set()
        self._waiters: set[ChangeWaiter] = set()

    @abc.abstractmethod
    async def _put(self, card: WorkerCard, lease: Lease) -> None:
        """Write (or refresh) the entry with a fresh expiry; raise on a foreign live lease."""

    @abc.abstractmethod
    async def _delete(self, worker_id: str, lease_id: str) -> None:
        """Remove the entry if it still belongs to ``lease_id``."""

    @abc.abstractmethod
    async def _snapshot(self) -> Snapshot:
        """All live entries."""

    def _wait_timeout(self) -> float:
        """Seconds a watcher sleeps between snapshots unless notified."""
        return self.config.poll_interval_s

    def _new_waiter(self) -> ChangeWaiter:
        """A waiter for one watcher; subclasses that can push changes hook it up."""
        waiter = ChangeWaiter()
        self._waiters.add(waiter)
        return waiter

    def _drop_waiter(self, waiter: ChangeWaiter) -> None:
        self._waiters.discard(waiter)

    async def register(self, card: WorkerCard, ttl_s: float | None = None) -> Registration:
        ttl = self._registration_ttl(ttl_s)
        lease = Lease(lease_id=uuid.uuid4().hex, ttl_s=ttl)
        await self._put(card, lease)

        async def remove() -> None:
            self._registrations.discard(registration)
            await self._delete(card.worker_id, lease.lease_id)

        interval = ttl * self.config.heartbeat_fraction
        registration = Registration(card, lease, interval, lambda: self._put(card, lease), remove)
        self._registrations.add(registration)
        return registration

    async def list(self, model: str | None = None) -> list[WorkerCard]:
        snapshot = await self._snapshot()
        cards = [card for _, card in snapshot.values() if model is None or card.model == model]
        return sorted(cards, key=lambda card: card.worker_id)

    async def watch(self) -> AsyncIterator[DiscoveryEvent]:
        # Each round diffs the live set against the previous one. The waiter exists before the
        # first snapshot, so a change made between a snapshot and the next wait is not missed.
        waiter = self._new_waiter()
        seen: Snapshot = {}
        try:
            while not self._closed:
                current = await self._snapshot()
                for event in diff_snapshots(seen, current):
                    yield event
                seen = current
                await waiter.wait(self._wait_timeout())
        finally:
            self._drop_waiter(waiter)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for registration in list(self._registrations):
            await registration.withdraw()
        for waiter in list(self._waiters):
            waiter.notify()


def diff_snapshots(old: Snapshot, new: Snapshot) -> list[DiscoveryEvent]:
    """Events that turn ``old`` into ``new``; a changed lease or card is REMOVED then ADDED."""
    events = []
    for worker_id, (lease_id, card) in old.items():
        if new.get(worker_id) != (lease_id, card):
            events.append(DiscoveryEvent(EventKind.REMOVED, card))
    for worker_id, (lease_id, card) in new.items():
        if old.get(worker_id) != (lease_id, card):
            events.append(DiscoveryEvent(EventKind.ADDED, card))
    return events
