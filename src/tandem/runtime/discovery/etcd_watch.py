"""The watch of etcd discovery: list the worker prefix, then follow it, across outages.

:class:`PrefixWatcher` lists the cards under the prefix, then follows a (leader-requiring) etcd
watch from the listed revision + 1. When the watch breaks it emits nothing and keeps the set it
announced; once etcd answers it lists again and emits only real differences, giving announced
workers that went missing ``grace_s`` to come back (an etcd that lost its data). The rules are
in docs/discovery-etcd.md (Watch).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator

import aetcd

from tandem.protocols.worker_card import WorkerCard, WorkerCardError
from tandem.runtime.backoff import Backoff
from tandem.runtime.discovery.base import DiscoveryClosedError, DiscoveryEvent, EventKind
from tandem.runtime.discovery.etcd_client import EtcdConnection, UnreachableError, is_transient, short_error

log = logging.getLogger("tandem.runtime.discovery.etcd")  # one logger for the whole backend


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


class PrefixWatcher:
    """Reads and watches the worker cards under ``prefix`` over ``conn``."""

    def __init__(self, conn: EtcdConnection, prefix: bytes, grace_s: float) -> None:
        self._conn = conn
        self.prefix = prefix
        self.grace_s = grace_s
        self._queues: set[asyncio.Queue[object]] = set()

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

    async def read(self, client: aetcd.Client) -> tuple[dict[str, WorkerCard], int]:
        """The valid cards under the prefix, by worker id, and the revision they were read at."""
        response = await client.get_prefix(self.prefix)
        cards = {}
        for kv in response:
            card = self._decode(kv.key, kv.value)
            if card is not None:
                cards[card.worker_id] = card
        return cards, response.header.revision

    async def watch(self) -> AsyncIterator[DiscoveryEvent]:
        """The current cards as ADDED, then every change, until the connection closes."""
        view = _View(grace_s=self.grace_s)
        backoff = Backoff()
        grace = False  # the next listing follows a broken watch
        while not self._conn.closed:
            step = "listing"
            try:
                current, revision = await self._conn.call(self.read)
                for event in view.relist(current, grace):
                    yield event
                grace = False
                step = "watching"
                generation = self._conn.generation
                watch = await self._conn.call(lambda c: c.watch_prefix(self.prefix, start_revision=revision + 1))
            except aetcd.RevisionCompactedError:  # (only the watch raises it): list again from now
                continue
            except Exception as exc:
                if not isinstance(exc, (UnreachableError, DiscoveryClosedError)):
                    # not the connection (e.g. permissions): keep trying, loudly
                    log.warning("etcd discovery: %s %r failed: %s", step, self.prefix, short_error(exc))
                grace = True
                await self._conn.sleep(backoff.next())
                continue
            backoff.reset()
            queue: asyncio.Queue[object] = asyncio.Queue()
            self._queues.add(queue)
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
                        if is_transient(item):
                            self._conn.failed(generation, item)
                        else:
                            log.warning("etcd watch failed: %s", short_error(item))
                    grace = True  # an error or the end of the stream: list again once etcd answers
                    if not self._conn.closed:
                        await self._conn.sleep(backoff.next())
                    break
            finally:
                self._queues.discard(queue)
                pump.cancel()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(watch.cancel(), 1.0)

    @staticmethod
    async def _pump(watch: AsyncIterable[object], queue: asyncio.Queue[object]) -> None:
        """Move a watch stream's events into ``queue``, then its end (_END) or its error."""
        try:
            async for event in watch:
                queue.put_nowait(event)
            queue.put_nowait(_END)
        except Exception as exc:
            queue.put_nowait(exc)

    def end_all(self) -> None:
        """End every running watch (the connection is closing)."""
        for queue in list(self._queues):
            queue.put_nowait(_END)
