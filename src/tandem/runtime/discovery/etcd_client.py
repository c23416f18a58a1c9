"""The etcd connection under etcd discovery: one aetcd client at a time, failing over across endpoints.

Every call goes to the current endpoint; a connection failure replaces the client with a fresh
one on the next endpoint (aetcd connects to one address, so this is also the failover), and
outages are logged once when they start and once when they end. Watch streams require a leader
(``_LeaderAwareClient``). The lease (etcd_lease) and the watch (etcd_watch) run their calls
through :class:`EtcdConnection`; the rules are in docs/discovery-etcd.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import aetcd
import aetcd.exceptions
import grpc

from tandem.runtime.backoff import BACKOFF_INITIAL_S, BACKOFF_MAX_S
from tandem.runtime.discovery.base import DiscoveryClosedError

log = logging.getLogger("tandem.runtime.discovery.etcd")  # one logger for the whole backend

T = TypeVar("T")

RPC_TIMEOUT_S = 3.0
"""Deadline of one etcd call (also of creating a watch): a blackholed endpoint fails within it."""

_GRPC_OPTIONS: dict[str, int] = {
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


class _LeaderAwareClient(aetcd.Client):  # type: ignore[misc]  # aetcd ships no type information
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


class UnreachableError(Exception):
    """One call to the current endpoint failed for lack of a connection (the client moved on)."""

    def __init__(self, message: str, stale: bool = False) -> None:
        super().__init__(message)
        self.stale = stale
        """The call ran on a connection that another task had already given up: not a new failure."""


class LeaseLostError(Exception):
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


def short_error(exc: BaseException) -> str:
    """The first line of ``exc``'s message (or its type's name), at most 200 characters, for logs."""
    return (str(exc) or type(exc).__name__).splitlines()[0][:200]


def is_transient(exc: BaseException) -> bool:
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
        log.debug("etcd endpoint %s:%s failed: %s", *endpoint, short_error(exc))
        if self.failures == 0:
            self.first_failure = time.monotonic()
        self.failures += 1
        if self.since is None and self.failures >= self.count:
            self.since = self.first_failure
            log.warning("etcd unreachable at %s (%s); retrying with backoff", self.where, short_error(exc))

    def up(self) -> None:
        self.failures = 0
        if self.since is not None:
            log.info("etcd reachable again at %s after %.1fs", self.where, time.monotonic() - self.since)
            self.since = None


class EtcdConnection:
    """The client on the current endpoint of ``endpoints``, replaced on a connection failure.

    Each replacement bumps :attr:`generation`, so that a failure seen on a connection that was
    already given up does not move the client twice. Constructing connects to nothing.
    """

    def __init__(self, endpoints: list[tuple[str, int]]) -> None:
        self.endpoints = endpoints
        self.outage = _Outage(endpoints)
        self._client: aetcd.Client | None = None
        self._endpoint_index = 0
        self.generation = 0
        """Bumped whenever the client is replaced."""
        self.closed = False
        """close began: loops stop, and the calls that closing itself makes still go through."""
        self._shut = False  # close finished: no more calls
        self._closed_event = asyncio.Event()
        self._background: set[asyncio.Task[object]] = set()

    def current(self) -> tuple[aetcd.Client, int]:
        """The client (created on first use) and its generation; DiscoveryClosedError once shut."""
        if self._shut:
            raise DiscoveryClosedError("discovery is closed")
        if self._client is None:
            host, port = self.endpoints[self._endpoint_index]
            self._client = _LeaderAwareClient(host, port, timeout=RPC_TIMEOUT_S, options=dict(_GRPC_OPTIONS))
        return self._client, self.generation

    def failed(self, generation: int, exc: BaseException) -> None:
        """The connection of ``generation`` failed: later calls use the next endpoint, on a fresh channel."""
        if generation != self.generation or self._client is None:
            return  # someone already moved on (this may be the echo of closing the old client)
        self.outage.down(self.endpoints[self._endpoint_index], exc)
        old, self._client = self._client, None
        self.generation += 1
        self._endpoint_index = (self._endpoint_index + 1) % len(self.endpoints)
        self.spawn(self._close_client(old))

    async def _close_client(self, client: aetcd.Client) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.close(), RPC_TIMEOUT_S)

    def spawn(self, coro: Awaitable[object]) -> None:
        """Run ``coro`` in the background; :meth:`shut` waits for it."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def call(self, op: Callable[[aetcd.Client], Awaitable[T]]) -> T:
        """Run ``op`` once on the current endpoint. Raises UnreachableError (after moving to the
        next endpoint) when the connection failed, LeaseLostError when etcd has no such lease."""
        client, generation = self.current()
        try:
            result = await op(client)
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # we are being cancelled
            # grpc.aio cancels the calls of a channel that is closed under them (we replaced it)
            stale = generation != self.generation
            self.failed(generation, exc)
            raise UnreachableError("call cancelled by a closed channel", stale) from None
        except Exception as exc:
            if _is_lease_not_found(exc):
                raise LeaseLostError(str(exc)) from exc
            if not is_transient(exc):
                raise
            stale = generation != self.generation
            self.failed(generation, exc)
            raise UnreachableError(short_error(exc), stale) from exc
        if generation == self.generation:
            self.outage.up()
        return result

    async def call_any(self, op: Callable[[aetcd.Client], Awaitable[T]]) -> T:
        """``call`` on each endpoint in turn until one answers; DiscoveryUnavailableError if none."""
        error: UnreachableError | None = None
        failures = 0
        for _ in range(2 * len(self.endpoints) + 1):  # stale failures (a replaced channel) do not count
            try:
                return await self.call(op)
            except UnreachableError as exc:
                error = exc
                failures += not exc.stale
                if failures == len(self.endpoints):
                    break
        raise DiscoveryUnavailableError(f"etcd unreachable at {self.outage.where}: {error}")

    async def sleep(self, seconds: float) -> None:
        """Sleep, waking early when the connection starts closing."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closed_event.wait(), seconds)

    def begin_close(self) -> None:
        """Mark the connection as closing (loops stop, sleepers wake); calls still go through."""
        self.closed = True
        self._closed_event.set()

    async def shut(self) -> None:
        """Refuse further calls, close the client and wait for the background tasks."""
        self._shut = True
        client, self._client = self._client, None
        if client is not None:
            await self._close_client(client)
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
