"""Follow one worker's KV events into the router's indexer, recovering from gaps.

Order of business for a newly discovered worker: subscribe to its PUB socket first (ZMQ queues
what arrives meanwhile), then take a full dump over the request plane (``kv_dump``: the blocks
it holds as of sequence number S), then apply queued and new batches with seq > S. A batch
whose seq skips ahead (a missed batch) is recovered from the worker's replay endpoint, or, when
the replay buffer no longer reaches back that far, by a fresh dump.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from dataclasses import dataclass, field

import msgspec
import zmq
import zmq.asyncio

from tandem.engine.kv_events import AllBlocksCleared, BlockStored, KVEventBatch, decode_batch
from tandem.runtime.request_plane import RequestPlaneClient, RequestPlaneError
from tandem.runtime.worker_card import WorkerCard
from tandem.worker.kv_publisher import SEQ_FRAME, replay

logger = logging.getLogger(__name__)


@dataclass
class FollowerStats:
    batches_received: int = 0
    """Event batches applied from the PUB stream."""
    last_seq: int = -1
    """Sequence number of the latest batch applied (from the stream, a replay or a dump)."""
    gaps_recovered: int = 0
    """Missed batches detected and recovered (by replay or dump)."""
    dumps: int = 0
    """Full dumps taken (at discovery, and when a replay could not close a gap)."""
    malformed: int = 0
    """Frames that did not decode (dropped)."""
    errors: list[str] = field(default_factory=list)


class KvEventFollower:
    def __init__(self, card: WorkerCard, indexer, client: RequestPlaneClient) -> None:  # noqa: ANN001
        self.card, self.indexer, self.client = card, indexer, client
        self.stats = FollowerStats()
        self._task: asyncio.Task | None = None
        self._socket: zmq.asyncio.Socket | None = None

    def start(self) -> None:
        ctx = zmq.asyncio.Context.instance()
        self._socket = ctx.socket(zmq.SUB)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.SUBSCRIBE, b"")
        assert self.card.kv_events_address is not None
        self._socket.connect(self.card.kv_events_address)
        self._task = asyncio.create_task(self._run(), name=f"kv-events-{self.card.worker_id}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._socket is not None:
            self._socket.close()

    async def _run(self) -> None:
        assert self._socket is not None
        await asyncio.sleep(0.05)  # let the subscription reach the publisher before the dump
        await self._dump()
        while True:
            try:
                frames = await self._socket.recv_multipart()
                seq, batch = SEQ_FRAME.unpack(frames[1])[0], decode_batch(frames[2])
            except (IndexError, struct.error, msgspec.DecodeError):
                self.stats.malformed += 1
                continue
            if seq <= self.stats.last_seq:
                continue  # already covered by a dump or a replay
            if seq > self.stats.last_seq + 1:
                await self._recover(seq)
                if seq <= self.stats.last_seq:
                    continue
            self._apply(seq, batch)
            self.stats.batches_received += 1

    def _apply(self, seq: int, batch: KVEventBatch) -> None:
        for event in batch.events:
            self.indexer.apply(self.card.worker_id, event)
        self.stats.last_seq = seq

    async def _recover(self, seq: int) -> None:
        """Batches last_seq+1 .. seq-1 went missing: replay them, or dump when that fails."""
        self.stats.gaps_recovered += 1
        want = self.stats.last_seq + 1
        address = self.card.kv_replay_address
        if address is not None:
            try:
                batches = await asyncio.to_thread(replay, address, want)
            except TimeoutError as exc:
                batches = []
                self.stats.errors.append(str(exc))
            if batches and batches[0][0] == want:
                for replayed_seq, payload in batches:
                    if replayed_seq > self.stats.last_seq:
                        self._apply(replayed_seq, decode_batch(payload))
                return
        logger.info("worker %s: batches from %d are gone from its replay buffer; taking a dump",
                    self.card.worker_id, want)
        await self._dump()

    async def _dump(self) -> None:
        try:
            dump = await self.client.call(self.card.request_plane_address, "kv_dump", None, timeout=10.0)
        except RequestPlaneError as exc:
            self.stats.errors.append(f"dump failed: {exc}")
            logger.warning("worker %s: KV dump failed: %s", self.card.worker_id, exc)
            return
        events = msgspec.convert(dump["events"], list[BlockStored])
        self.indexer.apply(self.card.worker_id, AllBlocksCleared())
        for event in events:
            self.indexer.apply(self.card.worker_id, event)
        self.stats.last_seq = max(self.stats.last_seq, int(dump["seq"]))
        self.stats.dumps += 1
