"""Follow one worker's KV events from its NATS JetStream subject (runtime/nats_layout.py).

Same semantics as the ZMQ follower, with the stream as the replay buffer:

* **Start.** If the stream still holds the worker's history from seq 0, the index is rebuilt
  from the stream alone (a router that restarts replays what it missed). Otherwise the follower
  first subscribes from the stream's end, then takes a ``kv_dump`` over the request plane, and
  applies only batches with seq > the dump's seq.
* **Live.** An ordered JetStream consumer on the worker's subject, with flow control: the
  server never runs far ahead of a slow router, and nats-py re-creates the consumer from the
  last stream position it delivered when NATS restarts or deliveries skip. A message the
  client drops anyway (its pending limits) shows up as a gap in seq, closed from the stream.
* **Gap** (a seq that skips ahead). The missing range is read again from the stream, scanning
  the worker's messages from just after the last one applied (a batch the worker re-sent after
  a lost ack can sit after later ones; a delivery the router lost is still there); when the stream no longer has
  all of it (limits dropped it, or the worker never got it into NATS), a dump (kv_follower_core.py).

Messages without a valid ``Tandem-Seq`` header, or whose payload does not decode, are counted
in ``stats.malformed`` and dropped.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import nats.errors
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError

from tandem.protocols.worker_card import WorkerCard
from tandem.router.kv.follower_core import KvEventFollowerCore
from tandem.router.kv.indexer import KvIndexer
from tandem.runtime.event_plane import nats_layout
from tandem.runtime.event_plane.nats_router_plane import NatsRouterPlane
from tandem.runtime.request_plane import RequestPlaneClient

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NatsFollowerConfig:
    idle_heartbeat_s: float = 1.0
    """Heartbeat of the ordered consumer: a consumer lost with a NATS restart is re-created after
    two missed heartbeats."""
    max_replay_scan: int = 10_000
    """Stream messages a gap replay reads at most before giving up (and taking a dump)."""
    reorder_slack: int = 512
    """A gap replay stops looking once it has passed this many later batches of the worker."""
    retry_s: float = 1.0
    """Pause before subscribing again after the subscription failed."""


@dataclass(frozen=True)
class _StoredMessage:
    """One of the worker's messages as read back from the stream."""

    position: int
    """Its stream sequence."""
    seq: int | None
    """Its ``Tandem-Seq`` header (None: missing or invalid)."""
    data: bytes


class NatsKvEventFollower(KvEventFollowerCore):
    transport = "nats"

    def __init__(
        self,
        card: WorkerCard,
        indexer: KvIndexer,
        client: RequestPlaneClient,
        plane: NatsRouterPlane,
        config: NatsFollowerConfig | None = None,
    ) -> None:
        super().__init__(card, indexer, client)
        if card.kv_events_subject is None:
            raise ValueError(f"worker {card.worker_id} publishes no NATS subject")
        self.plane, self.config = plane, config or NatsFollowerConfig()
        self.subject = card.kv_events_subject
        self.namespace, _ = nats_layout.parse_kv_subject(self.subject)
        self.stream: str | None = None
        self._position = 0
        """Stream sequence up to which every message of the worker is accounted for (applied, or
        covered by a dump or replay); a gap scan starts after it."""
        self._sub: JetStreamContext.PushSubscription | None = None

    async def _run(self) -> None:
        await self._begin()
        while True:
            try:
                await self._follow()
            except (TimeoutError, nats.errors.Error, OSError) as exc:
                self.stats.error(f"subscription lost: {exc!r}")
                logger.warning(
                    "worker %s: KV subscription lost (%r); resuming from the stream", self.card.worker_id, exc
                )
            await self._unsubscribe()
            await asyncio.sleep(self.config.retry_s)

    async def _begin(self) -> None:
        """Pick the start: the stream's history from seq 0, or its end plus a dump."""
        while True:
            try:
                js = await self.plane.jetstream()
                self.stream = await self.plane.stream_for(self.namespace)
                first = await self._next_message(1)
                if first is not None and first.seq == 0:
                    self._position = first.position - 1
                    await self._subscribe()
                    return
                self._position = (await js.stream_info(self.stream)).state.last_seq
                await self._subscribe()
                break
            except (TimeoutError, nats.errors.Error, OSError) as exc:
                self.stats.error(f"cannot follow {self.subject} yet: {exc!r}")
                await self._unsubscribe()
                await asyncio.sleep(self.config.retry_s)
        await self._dump()

    async def _subscribe(self) -> None:
        js = await self.plane.jetstream()
        config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=self._position + 1)
        self._sub = await js.subscribe(
            self.subject,
            stream=self.stream,
            config=config,
            ordered_consumer=True,
            idle_heartbeat=self.config.idle_heartbeat_s,
        )

    async def _follow(self) -> None:
        if self._sub is None:
            await self._subscribe()
        assert self._sub is not None  # _subscribe sets it or raises
        async for msg in self._sub.messages:
            try:
                position = msg.metadata.sequence.stream
            except (ValueError, IndexError, AttributeError):
                self.stats.malformed += 1
                continue
            seq = _seq_of(msg.headers)
            if seq is None:
                self.stats.malformed += 1
                continue
            await self._receive(seq, msg.data)
            if self.stats.last_seq >= seq:  # applied or covered: a later gap scan starts after it
                self._position = max(self._position, position)
        raise nats.errors.ConnectionClosedError  # the iterator ends only when the connection does

    async def _replay(self, want: int, until: int) -> list[tuple[int, bytes]]:
        """Scan the worker's messages after the last one applied for seqs want .. until-1."""
        found: list[tuple[int, bytes]] = []
        position, beyond = self._position, 0
        try:
            for _ in range(self.config.max_replay_scan):
                msg = await self._next_message(position + 1)
                if msg is None:
                    break
                position = msg.position
                seq = msg.seq
                if seq == want + len(found):
                    found.append((seq, msg.data))
                    if seq >= until - 1:
                        break
                elif seq is not None and seq >= until:
                    # A batch re-sent after a lost ack lands a little after later ones; past that
                    # slack, what is missing is not in the stream.
                    beyond += 1
                    if beyond > self.config.reorder_slack:
                        break
        except (TimeoutError, nats.errors.Error, OSError) as exc:
            self.stats.error(f"replay from the stream failed: {exc!r}")
        return found

    async def _next_message(self, start: int) -> _StoredMessage | None:
        """The worker's first message at or after stream sequence ``start`` (None: there is none)."""
        assert self.stream is not None  # _begin looks the stream up before reading from it
        js = await self.plane.jetstream()
        try:
            msg = await js.get_msg(self.stream, seq=start, subject=self.subject, next=True)
        except NotFoundError:
            return None
        assert msg.seq is not None  # a message read from a stream has its stream sequence
        return _StoredMessage(position=msg.seq, seq=_seq_of(msg.headers), data=msg.data or b"")

    async def _unsubscribe(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            try:
                await sub.unsubscribe()
            except (TimeoutError, nats.errors.Error, OSError):
                pass

    async def _close(self) -> None:
        await self._unsubscribe()


def _seq_of(headers: dict[str, str] | None) -> int | None:
    """The ``Tandem-Seq`` header as a non-negative int, or None."""
    value = (headers or {}).get(nats_layout.SEQ_HEADER)
    try:
        seq = int(value) if value is not None else None
    except ValueError:
        return None
    return seq if seq is not None and seq >= 0 else None
