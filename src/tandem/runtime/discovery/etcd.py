"""etcd discovery: worker cards as JSON under ``/tandem/{namespace}/workers/{id}``, on one lease per process.

A client (aetcd: asyncio-native etcd v3 gRPC) registers cards in a transaction that refuses a
worker id held by another live lease, keeps its lease alive, re-registers everything after an
outage (a new lease if the old one expired), and fails over across endpoints. ``watch()`` lists,
then follows a leader-requiring etcd watch; across an outage it keeps the set it announced and
emits only real differences afterwards. Why aetcd, and every rule in detail: docs/discovery-etcd.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import aetcd
import aetcd.exceptions
import aetcd.rpc
import aetcd.transactions
import grpc

from tandem.protocols.worker_card import WorkerCard, WorkerCardError
from tandem.runtime.backoff import BACKOFF_INITIAL_S, BACKOFF_MAX_S, Backoff
from tandem.runtime.discovery.base import (
    Discovery,
    DiscoveryClosedError,
    DiscoveryConfig,
    DiscoveryEvent,
    EventKind,
    Lease,
    Registration,
    WorkerAlreadyRegisteredError,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

RPC_TIMEOUT_S = 3.0
"""Deadline of one etcd call (also of creating a watch): a blackholed endpoint fails within it."""

_GRPC_OPTIONS: dict[str, Any] = {
    # A fresh channel connects at once; these bound gRPC's own reconnect backoff (default: up to
    # 120 s) for a channel that stays up across an outage.
    "grpc.initial_reconnect_backoff_ms": int(BACKOFF_INITIAL_S * 1000),
    "grpc.max_reconnect_backoff_ms": int(BACKOFF_MAX_S * 1000),
    # HTTP/2 pings find a watch stream whose peer vanished without closing it (a cut link).
    # etcd refuses pings more often than every 5 s (--grpc-keepalive-min-time) and pings
    # without an open stream.
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
    "grpc.keepalive_permit_without_calls": 0,
    "grpc.http2.max_pings_without_data": 0,
}


class _LeaderAwareClient(aetcd.Client):
    """aetcd's client, with watch streams that require a leader.

    A member cut off from the rest of its cluster keeps serving the watches it has, silently:
    events written on the majority side never reach them. etcd's ``hasleader`` gRPC metadata (the
    Go client's ``WithRequireLeader``) makes the member cancel such a stream with "no leader"
    once it has had no leader for about three election timeouts; the watcher then fails over to
    the next endpoint like after any other watch error. (Reads, keep-alives and transactions need
    the leader anyway.) aetcd has no option for it, so this sets its watcher's metadata."""

    async def connect(self) -> None:
        await super().connect()
        watcher = getattr(self, "_watcher", None)
        if watcher is not None:
            watcher._metadata = (*(self.metadata or ()), ("hasleader", "true"))


class DiscoveryUnavailableError(ConnectionError):
    """No etcd endpoint answered."""


class _UnreachableError(Exception):
    """One call to the current endpoint failed for lack of a connection (the client moved on)."""

    def __init__(self, message: str, stale: bool = False) -> None:
        super().__init__(message)
        self.stale = stale
        """The call ran on a connection that another task had already given up: not a new failure."""


class _LeaseLostError(Exception):
    """etcd no longer knows this client's lease."""


def parse_endpoints(endpoints: str) -> list[tuple[str, int]]:
    """``"h1:2379,h2:2379"`` (``http://`` prefixes and ``[v6]:port`` allowed) as (host, port) pairs."""
    parsed = []
    for item in endpoints.split(","):
        item = item.strip().removeprefix("http://")
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"etcd endpoint must be host:port, got {item!r}")
        parsed.append((host, int(port)))  # an IPv6 host keeps its brackets: gRPC needs them
    if not parsed:
        raise ValueError(f"no etcd endpoint in {endpoints!r}")
    return parsed


class _Outage:
    """Logs once when etcd becomes unreachable (every endpoint failed in a row) and once when it
    answers again; one dead endpoint among live ones is only a debug line."""

    def __init__(self, endpoints: list[tuple[str, int]]) -> None:
        self.where = ",".join(f"{h}:{p}" for h, p in endpoints)
        self.count = len(endpoints)
        self.failures = 0  # consecutive
        self.first_failure = 0.0
        self.since: float | None = None

    def down(self, endpoint: tuple[str, int], exc: BaseException) -> None:
        log.debug("etcd endpoint %s:%s failed: %s", *endpoint, _short(exc))
        if self.failures == 0:
            self.first_failure = time.monotonic()
        self.failures += 1
        if self.since is None and self.failures >= self.count:
            self.since = self.first_failure
            log.warning("etcd unreachable at %s (%s); retrying with backoff", self.where, _short(exc))

    def up(self) -> None:
        self.failures = 0
        if self.since is not None:
            log.info("etcd reachable again at %s after %.1fs", self.where, time.monotonic() - self.since)
            self.since = None


def _short(exc: BaseException) -> str:
    return (str(exc) or type(exc).__name__).splitlines()[0][:200]


def _is_transient(exc: BaseException) -> bool:
    """A failure of the connection (retry elsewhere / later), not of the request itself."""
    if isinstance(
        exc,
        (
            aetcd.RevisionCompactedError,
            aetcd.InvalidArgumentError,
            aetcd.PreconditionFailedError,
            aetcd.DuplicateLeaseError,
            aetcd.exceptions.UnauthenticatedError,
        ),
    ):
        return False
    return isinstance(exc, (aetcd.ClientError, TimeoutError, OSError, grpc.RpcError, grpc.aio.UsageError))


def _is_lease_not_found(exc: BaseException) -> bool:
    return isinstance(exc, aetcd.ClientError) and "lease not found" in str(exc)


class _LeaseIs(aetcd.transactions.BaseCompare):
    """Transaction compare on the lease a key carries (aetcd has no helper for it; etcd >= 3.3)."""

    def __init__(self, key: bytes, lease_id: int) -> None:
        super().__init__(key)
        self.value, self.op = lease_id, aetcd.rpc.Compare.EQUAL

    def build_compare(self, compare: Any) -> None:
        compare.target = aetcd.rpc.Compare.LEASE
        compare.lease = int(self.value)


class _EtcdRegistration(Registration):
    """A registration on the client's shared lease: the client's keep-alive task refreshes it."""

    def __init__(self, owner: EtcdDiscovery, card: WorkerCard, lease: Lease, interval_s: float) -> None:
        self._owner = owner

        async def refresh() -> None:  # the lease is the client's, kept alive by its own task
            return None

        super().__init__(card, lease, interval_s, refresh, lambda: owner._withdraw(self))

    def abandon(self) -> None:
        """Stop keeping the entry alive; it expires after its TTL, as after a crash."""
        super().abandon()
        self._owner._abandon(self)


class _View:
    """What one watcher has announced, and announced workers missing since a re-list."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.cards: dict[str, WorkerCard] = {}
        self.missing: dict[str, float] = {}  # worker_id -> monotonic deadline for its REMOVED

    def relist(self, current: dict[str, WorkerCard], grace: bool) -> list[DiscoveryEvent]:
        events = []
        deadline = time.monotonic() + self.grace_s
        for worker_id in [w for w in self.cards if w not in current]:
            if grace:
                self.missing.setdefault(worker_id, deadline)
            else:
                events += self.delete(worker_id)
        for worker_id, card in current.items():
            events += self.put(worker_id, card)
        return events

    def put(self, worker_id: str, card: WorkerCard) -> list[DiscoveryEvent]:
        """ADDED for a new card; a card that changed in place is REMOVED, then ADDED (as the
        file discovery reports it: listeners drop what they knew of the old one)."""
        self.missing.pop(worker_id, None)
        old = self.cards.get(worker_id)
        if old == card:
            return []
        self.cards[worker_id] = card
        removed = [] if old is None else [DiscoveryEvent(EventKind.REMOVED, old)]
        return removed + [DiscoveryEvent(EventKind.ADDED, card)]

    def delete(self, worker_id: str) -> list[DiscoveryEvent]:
        self.missing.pop(worker_id, None)
        card = self.cards.pop(worker_id, None)
        return [] if card is None else [DiscoveryEvent(EventKind.REMOVED, card)]

    def expire(self) -> list[DiscoveryEvent]:
        now = time.monotonic()
        return [e for w, d in list(self.missing.items()) if d <= now for e in self.delete(w)]

    def seconds_to_deadline(self) -> float | None:
        if not self.missing:
            return None
        return max(0.0, min(self.missing.values()) - time.monotonic())


_END = object()  # a watch stream ended without an error (its client was closed)


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
        self._outage = _Outage(self.endpoints)
        self._client: aetcd.Client | None = None
        self._endpoint_index = 0
        self._generation = 0  # bumped whenever the client is replaced
        self._closed = False
        self._shut = False  # close() finished: no more calls
        self._closed_event = asyncio.Event()
        self._background: set[asyncio.Task[Any]] = set()
        self._watch_queues: set[asyncio.Queue[Any]] = set()
        # Lease state; changed only under _lease_lock.
        self._lease_lock = asyncio.Lock()
        self._lease_id: int | None = None
        self._lease_ttl = 0
        self._ttl_s: float | None = None  # requested by the first register
        self._registrations: dict[str, _EtcdRegistration] = {}
        self._stale: set[str] = set()  # withdrawn while etcd was away: delete when it is back
        self._needs_resync = False  # re-put every registration (after an outage or a new lease)
        self._keeper: asyncio.Task[None] | None = None
        self._kick = asyncio.Event()

    # ------------------------------------------------------------------ connection

    def key(self, worker_id: str) -> bytes:
        """The etcd key of ``worker_id``."""
        return self.prefix + worker_id.encode()

    def _current(self) -> tuple[aetcd.Client, int]:
        if self._shut:
            raise DiscoveryClosedError("discovery is closed")
        if self._client is None:
            host, port = self.endpoints[self._endpoint_index]
            self._client = _LeaderAwareClient(host, port, timeout=RPC_TIMEOUT_S, options=dict(_GRPC_OPTIONS))
        return self._client, self._generation

    def _failed(self, generation: int, exc: BaseException) -> None:
        """The connection of ``generation`` failed: later calls use the next endpoint, on a fresh channel."""
        if generation != self._generation or self._client is None:
            return  # someone already moved on (this may be the echo of closing the old client)
        self._outage.down(self.endpoints[self._endpoint_index], exc)
        old, self._client = self._client, None
        self._generation += 1
        self._endpoint_index = (self._endpoint_index + 1) % len(self.endpoints)
        self._spawn(self._close_client(old))

    async def _close_client(self, client: aetcd.Client) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.close(), RPC_TIMEOUT_S)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _call(self, op: Callable[[aetcd.Client], Awaitable[T]]) -> T:
        """Run ``op`` once on the current endpoint. Raises _UnreachableError (after moving to the
        next endpoint) when the connection failed, _LeaseLostError when etcd has no such lease."""
        client, generation = self._current()
        try:
            result = await op(client)
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # we are being cancelled
            # grpc.aio cancels the calls of a channel that is closed under them (we replaced it)
            stale = generation != self._generation
            self._failed(generation, exc)
            raise _UnreachableError("call cancelled by a closed channel", stale) from None
        except Exception as exc:
            if _is_lease_not_found(exc):
                raise _LeaseLostError(str(exc)) from exc
            if not _is_transient(exc):
                raise
            stale = generation != self._generation
            self._failed(generation, exc)
            raise _UnreachableError(_short(exc), stale) from exc
        if generation == self._generation:
            self._outage.up()
        return result

    async def _call_any(self, op: Callable[[aetcd.Client], Awaitable[T]]) -> T:
        """``_call`` on each endpoint in turn until one answers; DiscoveryUnavailableError if none."""
        error: _UnreachableError | None = None
        failures = 0
        for _ in range(2 * len(self.endpoints) + 1):  # stale failures (a replaced channel) do not count
            try:
                return await self._call(op)
            except _UnreachableError as exc:
                error = exc
                failures += not exc.stale
                if failures == len(self.endpoints):
                    break
        raise DiscoveryUnavailableError(f"etcd unreachable at {self._outage.where}: {error}")

    async def _sleep(self, seconds: float) -> None:
        """Sleep, waking early when the client closes."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closed_event.wait(), seconds)

    # ------------------------------------------------------------------ registration

    async def _put_card(self, client: aetcd.Client, card: WorkerCard, lease_id: int) -> None:
        """Put ``card`` on ``lease_id`` if its key is absent or already ours; else raise
        WorkerAlreadyRegisteredError."""
        key, value, t = self.key(card.worker_id), card.to_json(), client.transactions
        succeeded, responses = await client.transaction(
            compare=[_LeaseIs(key, lease_id)],
            success=[t.put(key, value, lease=lease_id)],
            failure=[
                t.txn(compare=[t.version(key) == 0], success=[t.put(key, value, lease=lease_id)], failure=[t.get(key)])
            ],
        )
        if succeeded or responses[0].response_txn.succeeded:
            return
        kvs = responses[0].response_txn.responses[0].response_range.kvs
        holder = f"lease {kvs[0].lease:x}" if kvs and kvs[0].lease else "a key without a lease"
        raise WorkerAlreadyRegisteredError(
            f"worker_id {card.worker_id!r} is already registered in etcd ({holder}; ours is {lease_id:x})"
        )

    async def _delete_if_ours(self, client: aetcd.Client, worker_id: str, lease_id: int) -> None:
        key, t = self.key(worker_id), client.transactions
        await client.transaction(compare=[_LeaseIs(key, lease_id)], success=[t.delete(key)], failure=[])

    async def register(self, card: WorkerCard, ttl_s: float | None = None) -> Registration:
        ttl = self._registration_ttl(ttl_s)
        async with self._lease_lock:
            if card.worker_id in self._registrations:
                raise WorkerAlreadyRegisteredError(f"worker_id {card.worker_id!r} is already registered by this client")
            if self._ttl_s is None:
                self._ttl_s = ttl
            elif ttl != self._ttl_s:
                log.debug(
                    "register %s: ttl %.1fs ignored, the client's lease has %.1fs", card.worker_id, ttl, self._ttl_s
                )
            for attempt in range(2):
                if self._lease_id is None:
                    await self._grant_locked(any_endpoint=True)
                lease_id = self._lease_id
                assert lease_id is not None
                try:
                    await self._call_any(lambda c: self._put_card(c, card, lease_id))
                    break
                except _LeaseLostError:  # expired since the last keep-alive: grant another, once
                    if attempt:
                        raise DiscoveryUnavailableError("etcd keeps losing this client's lease") from None
                    self._lease_id = None
            registration = _EtcdRegistration(self, card, self._lease(), self._interval())
            self._registrations[card.worker_id] = registration
            self._stale.discard(card.worker_id)
        self._start_keeper()
        self._kick.set()  # a new lease may need the other registrations re-put
        return registration

    def _lease(self) -> Lease:
        return Lease(lease_id=f"{self._lease_id:x}", ttl_s=float(self._lease_ttl))

    def _requested_ttl_s(self) -> int:
        """The TTL to ask etcd for: the first registration's (else the config's), in whole seconds."""
        return max(1, math.ceil(self._ttl_s or self.config.ttl_s))

    def _interval(self) -> float:
        return max(0.1, self._lease_ttl * self.config.heartbeat_fraction)

    async def _grant_locked(self, any_endpoint: bool = False) -> None:
        """Grant the client's lease (caller holds _lease_lock); existing registrations must be re-put."""
        ttl = self._requested_ttl_s()
        call = self._call_any if any_endpoint else self._call
        lease = await call(lambda c: c.lease(ttl))
        self._lease_id, self._lease_ttl = lease.id, int(lease.ttl)
        for registration in self._registrations.values():
            registration.lease = self._lease()
        if self._registrations:
            self._needs_resync = True
        log.debug("etcd lease %x granted (ttl %ss)", lease.id, lease.ttl)

    async def _resync_locked(self) -> None:
        """Re-put every live registration and delete stale keys (caller holds _lease_lock)."""
        lease_id = self._lease_id
        assert lease_id is not None
        for worker_id, registration in list(self._registrations.items()):
            try:
                await self._call(lambda c: self._put_card(c, registration.card, lease_id))
            except WorkerAlreadyRegisteredError as exc:
                log.error("lost worker %s while etcd was away: %s", worker_id, exc)
                self._registrations.pop(worker_id, None)
        for worker_id in list(self._stale):
            await self._call(lambda c: self._delete_if_ours(c, worker_id, lease_id))
            self._stale.discard(worker_id)
        self._needs_resync = False

    def _start_keeper(self) -> None:
        if self._keeper is None or self._keeper.done():
            self._keeper = asyncio.get_running_loop().create_task(self._keep_alive(), name="etcd-lease-keepalive")

    async def _keep_alive(self) -> None:
        """Refresh the lease; after an outage re-put everything, after a lost lease grant a new one."""
        backoff = Backoff()
        while not self._closed:
            delay = self._interval()
            self._kick.clear()
            try:
                async with self._lease_lock:
                    if self._lease_id is None:
                        await self._grant_locked()
                    if self._needs_resync:
                        await self._resync_locked()
                    lease_id = self._lease_id
                reply = await self._call(lambda c: c.refresh_lease(lease_id))
                if reply is None:  # the keep-alive stream ended without an answer: try again
                    raise _UnreachableError("etcd gave no keep-alive reply")
                if reply.TTL <= 0:
                    raise _LeaseLostError(f"lease {lease_id:x} expired")
                backoff.reset()
            except _LeaseLostError:
                async with self._lease_lock:
                    if self._lease_id is not None:
                        log.warning(
                            "etcd lease %x is gone (expired while etcd was away, or etcd lost its data): "
                            "registering %d worker(s) again",
                            self._lease_id,
                            len(self._registrations),
                        )
                        self._lease_id = None
                delay = 0.0
            except _UnreachableError:
                self._needs_resync = True
                delay = backoff.next()
            except DiscoveryClosedError:
                return
            except Exception:
                log.exception("etcd keep-alive failed")
                self._needs_resync = True
                delay = backoff.next()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), delay)

    async def _withdraw(self, registration: _EtcdRegistration) -> None:
        worker_id = registration.card.worker_id
        async with self._lease_lock:
            if self._registrations.get(worker_id) is not registration:
                return
            del self._registrations[worker_id]
            if self._closed or self._lease_id is None:
                return  # closing revokes the lease; a lost lease took the key with it
            lease_id = self._lease_id
            # Marked stale before the call: if the call fails, or the caller's timeout cancels it
            # while etcd is slow, the keep-alive task deletes the key once etcd answers.
            self._stale.add(worker_id)
            self._needs_resync = True
            try:
                await self._call_any(lambda c: self._delete_if_ours(c, worker_id, lease_id))
            except DiscoveryUnavailableError as exc:
                log.warning("cannot remove worker %s from etcd now (%s); will when etcd is back", worker_id, exc)
                return
            self._stale.discard(worker_id)  # (the keep-alive's next resync re-puts the others: harmless)

    def _abandon(self, registration: _EtcdRegistration) -> None:
        """Forget a registration without deleting its key, so that it expires like a crashed worker's."""
        worker_id = registration.card.worker_id
        if self._registrations.get(worker_id) is not registration:
            return
        del self._registrations[worker_id]
        if self._registrations:
            # The lease stays alive for the others: move the key to a lease nobody refreshes.
            self._spawn(self._orphan(worker_id))
        elif self._keeper is not None:
            self._keeper.cancel()
            self._keeper, self._lease_id, self._needs_resync = None, None, False

    async def _orphan(self, worker_id: str) -> None:
        async with self._lease_lock:
            lease_id = self._lease_id
            if lease_id is None:
                return
            with contextlib.suppress(Exception):
                orphan = await self._call(lambda c: c.lease(self._requested_ttl_s()))
                key = self.key(worker_id)

                async def move(c: aetcd.Client) -> None:
                    got = await c.get(key)
                    if got is not None and got.lease == lease_id:
                        t = c.transactions
                        await c.transaction(
                            compare=[_LeaseIs(key, lease_id)],
                            success=[t.put(key, got.value, lease=orphan.id)],
                            failure=[],
                        )

                await self._call(move)

    # ------------------------------------------------------------------ reading

    def _decode(self, key: bytes, value: bytes) -> WorkerCard | None:
        worker_id = key[len(self.prefix) :].decode(errors="replace")
        try:
            card = WorkerCard.from_json(value)
        except WorkerCardError as exc:
            log.debug("discovery: ignoring malformed etcd value at %r: %s", key, exc)
            return None
        if card.worker_id != worker_id:
            log.debug("discovery: ignoring %r: it holds the card of %r", key, card.worker_id)
            return None
        return card

    async def _read(self, client: aetcd.Client) -> tuple[dict[str, WorkerCard], int]:
        response = await client.get_prefix(self.prefix)
        cards = {}
        for kv in response:
            card = self._decode(kv.key, kv.value)
            if card is not None:
                cards[card.worker_id] = card
        return cards, response.header.revision

    async def list(self, model: str | None = None) -> list[WorkerCard]:
        """Live cards from etcd; raises DiscoveryUnavailableError when no endpoint answers."""
        if self._closed:
            raise DiscoveryClosedError("discovery is closed")
        cards, _ = await self._call_any(self._read)
        return sorted((c for c in cards.values() if model is None or c.model == model), key=lambda c: c.worker_id)

    async def watch(self) -> AsyncIterator[DiscoveryEvent]:
        view = _View(grace_s=self.config.ttl_s)
        backoff = Backoff()
        grace = False  # the next listing follows a broken watch
        while not self._closed:
            step = "listing"
            try:
                current, revision = await self._call(self._read)
                for event in view.relist(current, grace):
                    yield event
                grace = False
                step = "watching"
                generation = self._generation
                watch = await self._call(lambda c: c.watch_prefix(self.prefix, start_revision=revision + 1))
            except aetcd.RevisionCompactedError:  # (only the watch raises it): list again from now
                continue
            except Exception as exc:
                if not isinstance(exc, (_UnreachableError, DiscoveryClosedError)):
                    # not the connection (e.g. permissions): keep trying, loudly
                    log.warning("etcd discovery: %s %r failed: %s", step, self.prefix, _short(exc))
                grace = True
                await self._sleep(backoff.next())
                continue
            backoff.reset()
            queue: asyncio.Queue[Any] = asyncio.Queue()
            self._watch_queues.add(queue)
            pump = asyncio.get_running_loop().create_task(self._pump(watch, queue))
            try:
                while True:
                    try:
                        item = await asyncio.wait_for(queue.get(), view.seconds_to_deadline())
                    except TimeoutError:
                        for event in view.expire():
                            yield event
                        continue
                    if isinstance(item, aetcd.Event):
                        worker_id = item.kv.key[len(self.prefix) :].decode(errors="replace")
                        card = self._decode(item.kv.key, item.kv.value) if item.kind == "PUT" else None
                        for event in view.put(worker_id, card) if card is not None else view.delete(worker_id):
                            yield event
                        continue
                    if isinstance(item, aetcd.RevisionCompactedError):
                        break  # list again from now
                    if isinstance(item, BaseException):
                        if _is_transient(item):
                            self._failed(generation, item)
                        else:
                            log.warning("etcd watch failed: %s", _short(item))
                    grace = True  # an error or the end of the stream: list again once etcd answers
                    if not self._closed:
                        await self._sleep(backoff.next())
                    break
            finally:
                self._watch_queues.discard(queue)
                pump.cancel()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(watch.cancel(), 1.0)

    @staticmethod
    async def _pump(watch: Any, queue: asyncio.Queue[Any]) -> None:
        """Move a watch stream's events into ``queue``, then its end (_END) or its error."""
        try:
            async for event in watch:
                queue.put_nowait(event)
            queue.put_nowait(_END)
        except Exception as exc:
            queue.put_nowait(exc)

    # ------------------------------------------------------------------ closing

    async def close(self) -> None:
        """Withdraw this client's registrations (by revoking its lease), end its watchers and
        close the connection. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._closed_event.set()
        self._kick.set()
        for queue in list(self._watch_queues):
            queue.put_nowait(_END)
        for registration in list(self._registrations.values()):
            await registration.withdraw()  # no call to etcd: the lease revocation removes the keys
        if self._keeper is not None:
            self._keeper.cancel()
            await asyncio.gather(self._keeper, return_exceptions=True)
        async with self._lease_lock:
            if self._lease_id is not None:
                lease_id = self._lease_id
                try:
                    await self._call_any(lambda c: c.revoke_lease(lease_id))
                except Exception as exc:  # it expires by itself after its TTL
                    log.warning(
                        "could not revoke etcd lease %x (%s); it expires in %ss", lease_id, _short(exc), self._lease_ttl
                    )
            self._lease_id = None
        self._shut = True
        client, self._client = self._client, None
        if client is not None:
            await self._close_client(client)
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
