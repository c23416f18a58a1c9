"""The worker's KV event publisher on the NATS event plane (runtime/nats_layout.py).

Same interface as the ZMQ ``KvEventPublisher``: ``publish(seq, batch)`` on the engine thread,
``dump()`` for ``kv_dump`` (the shared ``BlockTable``), ``close()``. Each batch goes to the
worker's JetStream subject with its seq in a header; the stream is the replay buffer, so there
is no replay socket. Every ``load_interval_s`` the worker's load (EngineStats) goes out on its
core-NATS load subject.

Threads: ``publish`` only updates the table and appends to a bounded queue; a background thread
runs its own asyncio loop with the NATS client, which sends the queue in order, in windows of
up to ``window`` unacknowledged batches. A window that fails (NATS away, no ack in time) is
sent again from its first unacknowledged batch (``Nats-Msg-Id`` makes the repeats harmless);
nats-py reconnects by itself. When the queue overflows, the oldest batches are dropped: routers
see the gap and take a dump.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import nats.errors
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import PubAck
from nats.js.errors import NoStreamResponseError

from tandem.protocols.kv_events import BlockStored, KVEventBatch, encode_batch
from tandem.runtime.event_plane import nats_layout
from tandem.runtime.event_plane.config import DEFAULT_NAMESPACE, DEFAULT_NATS_URL
from tandem.runtime.event_plane.zmq_publisher import BlockTable

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NatsPublisherConfig:
    url: str = DEFAULT_NATS_URL
    """NATS server(s), comma-separated."""
    namespace: str = DEFAULT_NAMESPACE
    """Subjects and the stream name are scoped by this."""
    limits: nats_layout.StreamLimits = field(default_factory=nats_layout.StreamLimits)
    """Retention of the KV stream when this worker creates it (max age 1 h, 100,000 batches per worker)."""
    load_interval_s: float = 1.0
    """Seconds between load-metric messages (0: none)."""
    max_queued: int = 100_000
    """Batches waiting for NATS before the oldest are dropped (routers then recover by a dump)."""
    window: int = 256
    """Batches in flight (sent, not yet acknowledged by JetStream) at most."""
    ack_timeout_s: float = 2.0
    """A window whose acks take longer than this is sent again."""
    close_timeout_s: float = 2.0
    """``close()`` waits this long for queued batches to reach NATS."""


class NatsKvEventPublisher:
    def __init__(self, worker_id: str, config: NatsPublisherConfig | None = None) -> None:
        self.config = config or NatsPublisherConfig()
        self.worker_id = worker_id
        self.token = nats_layout.subject_token(worker_id)
        self.subject = nats_layout.kv_subject(self.config.namespace, self.token)
        self.load_subject = nats_layout.load_subject(self.config.namespace, self.token)
        self.address = self.config.url
        """For the worker card: where the events are (the subject is ``subject``)."""
        self.replay_address: str | None = None  # JetStream is the replay buffer
        self.load_source: Callable[[], dict[str, Any]] | None = None
        """Returns the worker's load (EngineStats as a dict); set once the engine exists."""
        self._lock = threading.Lock()
        self._table = BlockTable()
        self._queue: deque[tuple[int, bytes]] = deque()
        self.last_seq = -1
        self.batches_published = 0
        """Batches handed to ``publish``."""
        self.batches_dropped = 0
        """Batches dropped because the queue overflowed."""
        self.connected = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._wakeup: asyncio.Event | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run_loop, name="tandem-kv-nats", daemon=True)
        self._thread.start()

    # --- engine thread ---

    def publish(self, seq: int, batch: KVEventBatch) -> None:
        """Queue one batch (called on the engine thread, as AsyncEngine's kv_event_sink)."""
        payload = encode_batch(batch)
        with self._lock:
            self._table.apply(batch)
            self.last_seq = seq
            self.batches_published += 1
            if len(self._queue) >= self.config.max_queued:
                self._queue.popleft()
                self.batches_dropped += 1
                if self.batches_dropped == 1 or self.batches_dropped % 1000 == 0:
                    logger.warning(
                        "NATS is not keeping up: %d KV event batches dropped so far (routers will take dumps)",
                        self.batches_dropped,
                    )
            self._queue.append((seq, payload))
        self._wake()

    def dump(self) -> tuple[int, list[BlockStored]]:
        """(seq the dump is current as of, the blocks held now as BlockStored events)."""
        with self._lock:
            return self.last_seq, self._table.as_events()

    @property
    def queued(self) -> int:
        with self._lock:
            return len(self._queue)

    def _wake(self) -> None:
        if self._wakeup is not None:
            try:
                self._loop.call_soon_threadsafe(self._wakeup.set)
            except RuntimeError:  # the loop is closed: we are shutting down
                pass

    def close(self) -> None:
        """Send what is queued (up to ``close_timeout_s``), then disconnect."""
        self._stopping = True
        self._wake()
        self._thread.join(timeout=self.config.close_timeout_s + 3)

    # --- NATS thread ---

    def _run_loop(self) -> None:
        try:
            self._loop.run_until_complete(self._main())
        except Exception:  # a dead publisher must say why
            logger.exception("the NATS KV event publisher of worker %s stopped", self.worker_id)
        finally:
            self._loop.close()

    async def _main(self) -> None:
        self._wakeup = wakeup = asyncio.Event()
        nc = await self._connect()
        if nc is None:
            return
        js = nc.jetstream()
        load_task = asyncio.create_task(self._send_load(nc)) if self.config.load_interval_s > 0 else None
        try:
            await self._send_batches(nc, js, wakeup)
        finally:
            if load_task is not None:
                load_task.cancel()
            try:
                await asyncio.wait_for(nc.close(), 2.0)
            except (TimeoutError, nats.errors.Error):
                pass

    async def _connect(self) -> NatsClient | None:
        """The connected client; None when closed before connecting."""
        connecting = asyncio.ensure_future(nats_layout.connect_with_retry(self.config.url, f"worker {self.worker_id}"))
        while not connecting.done():
            if self._stopping:
                connecting.cancel()
                return None
            await asyncio.wait({connecting}, timeout=0.2)
        nc = connecting.result()
        self.connected.set()
        logger.info("KV events of worker %s go to NATS subject %s", self.worker_id, self.subject)
        return nc

    async def _send_batches(self, nc: NatsClient, js: JetStreamContext, wakeup: asyncio.Event) -> None:
        """Send the queue in windows until closing; ``wakeup`` is set when ``publish`` queues a batch."""
        await self._ensure_stream(js)
        deadline = None
        failing = False  # log a run of failures once, not every retry
        while True:
            with self._lock:
                window = [self._queue[i] for i in range(min(self.config.window, len(self._queue)))]
            if not window:
                if self._stopping:
                    return
                wakeup.clear()
                await wakeup.wait()
                continue
            if self._stopping:
                deadline = deadline or time.monotonic() + self.config.close_timeout_s
                if time.monotonic() > deadline:
                    logger.warning("closing with %d KV event batches not yet in NATS", self.queued)
                    return
            if not nc.is_connected:  # nats-py is reconnecting: sending now would only pile up repeats
                await asyncio.sleep(0.1)
                continue
            acked, stream_missing = await self._send_window(js, window)
            if acked:
                last_acked = window[acked - 1][0]
                with self._lock:  # seqs increase along the queue; overflow may have dropped some already
                    while self._queue and self._queue[0][0] <= last_acked:
                        self._queue.popleft()
            if acked < len(window):
                if not failing:
                    logger.warning(
                        "KV event batches not acknowledged by JetStream (%s); retrying",
                        "no stream captures the subject" if stream_missing else "NATS away or slow",
                    )
                failing = True
                if stream_missing:
                    await self._ensure_stream(js)
                await asyncio.sleep(0.2)
            elif failing:
                logger.info("KV event batches reach JetStream again")
                failing = False

    async def _send_window(self, js: JetStreamContext, window: list[tuple[int, bytes]]) -> tuple[int, bool]:
        """Send a window in order. Returns (how many batches from its start were acknowledged in a
        row, whether no stream captured the subject)."""
        futures: list[asyncio.Future[PubAck]] = []
        try:
            for seq, payload in window:
                headers = {
                    nats_layout.MSG_ID_HEADER: f"{self.token}:{seq}",
                    nats_layout.SEQ_HEADER: str(seq),
                    nats_layout.WORKER_HEADER: self.worker_id,
                }
                futures.append(await js.publish_async(self.subject, payload, headers=headers, wait_stall=1.0))
        except (TimeoutError, nats.errors.Error, OSError) as exc:
            logger.debug("KV batch send failed: %r", exc)
        acked, stream_missing = 0, False
        for future in futures:
            try:
                await asyncio.wait_for(future, self.config.ack_timeout_s)
            except NoStreamResponseError:
                stream_missing = True
                break
            except (TimeoutError, nats.errors.Error) as exc:
                logger.debug("KV batch not acknowledged: %r", exc)
                break
            acked += 1
        for future in futures[acked:]:  # to be sent again; retrieve errors so asyncio does not log them
            if future.done() and not future.cancelled():
                future.exception()
            future.cancel()
        return acked, stream_missing

    async def _ensure_stream(self, js: JetStreamContext) -> str | None:
        try:
            return await nats_layout.ensure_stream(js, self.config.namespace, self.config.limits)
        except (TimeoutError, nats.errors.Error) as exc:
            logger.debug("could not create the KV stream yet: %r", exc)
            return None

    async def _send_load(self, nc: NatsClient) -> None:
        while True:
            await asyncio.sleep(self.config.load_interval_s)
            source = self.load_source
            if source is None or not nc.is_connected:
                continue
            try:
                load = {**source(), "worker_id": self.worker_id, "ts": time.time()}
                await nc.publish(self.load_subject, msgspec.msgpack.encode(load))
            except Exception as exc:  # metrics are best effort; never stop the loop
                logger.debug("load metrics not sent: %r", exc)
