"""The lease of etcd discovery: one per client, carrying every card that client registers.

:class:`LeaseKeeper` grants the lease on the first registration, puts each card in a transaction
that refuses a worker id held by another live lease, keeps the lease alive from one task, and
after an outage re-puts every registration (on a new lease if the old one expired). Withdrawing
deletes a key only while it still carries our lease; closing revokes the lease. The rules are in
docs/discovery-etcd.md (Leases, Outages).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable

import aetcd
import aetcd.rpc
import aetcd.transactions

from tandem.protocols.worker_card import WorkerCard
from tandem.runtime.backoff import Backoff
from tandem.runtime.discovery.base import (
    DiscoveryClosedError,
    DiscoveryConfig,
    Lease,
    Registration,
    WorkerAlreadyRegisteredError,
)
from tandem.runtime.discovery.etcd_client import (
    DiscoveryUnavailableError,
    EtcdConnection,
    LeaseLostError,
    UnreachableError,
    short_error,
)

log = logging.getLogger("tandem.runtime.discovery.etcd")  # one logger for the whole backend


class _LeaseIs(aetcd.transactions.BaseCompare):  # type: ignore[misc]  # aetcd ships no type information
    """Transaction compare on the lease a key carries (aetcd has no helper for it; etcd >= 3.3)."""

    def __init__(self, key: bytes, lease_id: int) -> None:
        super().__init__(key)
        self.value, self.op = lease_id, aetcd.rpc.Compare.EQUAL

    def build_compare(self, compare: aetcd.rpc.Compare) -> None:
        compare.target = aetcd.rpc.Compare.LEASE
        compare.lease = int(self.value)


class _EtcdRegistration(Registration):
    """A registration on the client's shared lease: the client's keep-alive task refreshes it."""

    def __init__(self, owner: LeaseKeeper, card: WorkerCard, lease: Lease, interval_s: float) -> None:
        self._owner = owner

        async def refresh() -> None:  # the lease is the client's, kept alive by its own task
            return None

        super().__init__(card, lease, interval_s, refresh, lambda: owner._withdraw(self))

    def abandon(self) -> None:
        """Stop keeping the entry alive; it expires after its TTL, as after a crash."""
        super().abandon()
        self._owner._abandon(self)


class LeaseKeeper:
    """The client's lease and the registrations on it, over ``conn``; ``key`` maps a worker id to
    its etcd key."""

    def __init__(self, conn: EtcdConnection, key: Callable[[str], bytes], config: DiscoveryConfig) -> None:
        self._conn = conn
        self._key = key
        self._config = config
        # Lease state; changed only under _lock.
        self._lock = asyncio.Lock()
        self._lease_id: int | None = None
        self._lease_ttl = 0
        self._ttl_s: float | None = None  # requested by the first register
        self._registrations: dict[str, _EtcdRegistration] = {}
        self._stale: set[str] = set()  # withdrawn while etcd was away: delete when it is back
        self._needs_resync = False  # re-put every registration (after an outage or a new lease)
        self._keeper: asyncio.Task[None] | None = None
        self._kick = asyncio.Event()

    async def _put_card(self, client: aetcd.Client, card: WorkerCard, lease_id: int) -> None:
        """Put ``card`` on ``lease_id`` if its key is absent or already ours; else raise
        WorkerAlreadyRegisteredError."""
        key, value, t = self._key(card.worker_id), card.to_json(), client.transactions
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
        key, t = self._key(worker_id), client.transactions
        await client.transaction(compare=[_LeaseIs(key, lease_id)], success=[t.delete(key)], failure=[])

    async def register(self, card: WorkerCard, ttl: float) -> Registration:
        """Put ``card`` on the client's lease (granted with ``ttl`` if this is the first card)."""
        async with self._lock:
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
                    await self._conn.call_any(lambda c: self._put_card(c, card, lease_id))
                    break
                except LeaseLostError:  # expired since the last keep-alive: grant another, once
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
        return max(1, math.ceil(self._ttl_s or self._config.ttl_s))

    def _interval(self) -> float:
        return max(0.1, self._lease_ttl * self._config.heartbeat_fraction)

    async def _grant_locked(self, any_endpoint: bool = False) -> None:
        """Grant the client's lease (caller holds _lock); existing registrations must be re-put."""
        ttl = self._requested_ttl_s()
        call = self._conn.call_any if any_endpoint else self._conn.call
        lease = await call(lambda c: c.lease(ttl))
        self._lease_id, self._lease_ttl = lease.id, int(lease.ttl)
        for registration in self._registrations.values():
            registration.lease = self._lease()
        if self._registrations:
            self._needs_resync = True
        log.debug("etcd lease %x granted (ttl %ss)", lease.id, lease.ttl)

    async def _resync_locked(self) -> None:
        """Re-put every live registration and delete stale keys (caller holds _lock)."""
        lease_id = self._lease_id
        assert lease_id is not None
        for worker_id, registration in list(self._registrations.items()):
            try:
                await self._conn.call(lambda c: self._put_card(c, registration.card, lease_id))
            except WorkerAlreadyRegisteredError as exc:
                log.error("lost worker %s while etcd was away: %s", worker_id, exc)
                self._registrations.pop(worker_id, None)
        for worker_id in list(self._stale):
            await self._conn.call(lambda c: self._delete_if_ours(c, worker_id, lease_id))
            self._stale.discard(worker_id)
        self._needs_resync = False

    def _start_keeper(self) -> None:
        if self._keeper is None or self._keeper.done():
            self._keeper = asyncio.get_running_loop().create_task(self._keep_alive(), name="etcd-lease-keepalive")

    async def _keep_alive(self) -> None:
        """Refresh the lease; after an outage re-put everything, after a lost lease grant a new one."""
        backoff = Backoff()
        while not self._conn.closed:
            delay = self._interval()
            self._kick.clear()
            try:
                async with self._lock:
                    if self._lease_id is None:
                        await self._grant_locked()
                    if self._needs_resync:
                        await self._resync_locked()
                    lease_id = self._lease_id
                reply = await self._conn.call(lambda c: c.refresh_lease(lease_id))
                if reply is None:  # the keep-alive stream ended without an answer: try again
                    raise UnreachableError("etcd gave no keep-alive reply")
                if reply.TTL <= 0:
                    raise LeaseLostError(f"lease {lease_id:x} expired")
                backoff.reset()
            except LeaseLostError:
                async with self._lock:
                    if self._lease_id is not None:
                        log.warning(
                            "etcd lease %x is gone (expired while etcd was away, or etcd lost its data): "
                            "registering %d worker(s) again",
                            self._lease_id,
                            len(self._registrations),
                        )
                        self._lease_id = None
                delay = 0.0
            except UnreachableError:
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
        async with self._lock:
            if self._registrations.get(worker_id) is not registration:
                return
            del self._registrations[worker_id]
            if self._conn.closed or self._lease_id is None:
                return  # closing revokes the lease; a lost lease took the key with it
            lease_id = self._lease_id
            # Marked stale before the call: if the call fails, or the caller's timeout cancels it
            # while etcd is slow, the keep-alive task deletes the key once etcd answers.
            self._stale.add(worker_id)
            self._needs_resync = True
            try:
                await self._conn.call_any(lambda c: self._delete_if_ours(c, worker_id, lease_id))
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
            self._conn.spawn(self._orphan(worker_id))
        elif self._keeper is not None:
            self._keeper.cancel()
            self._keeper, self._lease_id, self._needs_resync = None, None, False

    async def _orphan(self, worker_id: str) -> None:
        async with self._lock:
            lease_id = self._lease_id
            if lease_id is None:
                return
            with contextlib.suppress(Exception):
                orphan = await self._conn.call(lambda c: c.lease(self._requested_ttl_s()))
                key = self._key(worker_id)

                async def move(c: aetcd.Client) -> None:
                    got = await c.get(key)
                    if got is not None and got.lease == lease_id:
                        t = c.transactions
                        await c.transaction(
                            compare=[_LeaseIs(key, lease_id)],
                            success=[t.put(key, got.value, lease=orphan.id)],
                            failure=[],
                        )

                await self._conn.call(move)

    def wake(self) -> None:
        """Wake the keep-alive task now (it sees the connection closing and stops)."""
        self._kick.set()

    async def close(self) -> None:
        """Withdraw every registration by revoking the lease (the connection is already closing)."""
        for registration in list(self._registrations.values()):
            await registration.withdraw()  # no call to etcd: the lease revocation removes the keys
        if self._keeper is not None:
            self._keeper.cancel()
            await asyncio.gather(self._keeper, return_exceptions=True)
        async with self._lock:
            if self._lease_id is not None:
                lease_id = self._lease_id
                try:
                    await self._conn.call_any(lambda c: c.revoke_lease(lease_id))
                except Exception as exc:  # it expires by itself after its TTL
                    log.warning(
                        "could not revoke etcd lease %x (%s); it expires in %ss",
                        lease_id,
                        short_error(exc),
                        self._lease_ttl,
                    )
            self._lease_id = None
