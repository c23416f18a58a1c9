"""Follow one worker's KV events over ZMQ into the router's indexer, recovering from gaps.

Order of business for a newly discovered worker: subscribe to its PUB socket first (ZMQ queues
what arrives meanwhile), then take a full dump over the request plane (``kv_dump``: the blocks
it holds as of sequence number S), then apply queued and new batches with seq > S. A batch
whose seq skips ahead (a missed batch) is recovered from the worker's replay endpoint, or, when
the replay buffer no longer reaches back that far, by a fresh dump (kv_follower_core.py).
"""

from __future__ import annotations

import asyncio
import struct

import zmq
import zmq.asyncio

from tandem.protocols.kv_events import SEQ_FRAME
from tandem.protocols.worker_card import WorkerCard
from tandem.router.kv.follower_core import KvEventFollowerCore
from tandem.router.kv.indexer import KvIndexer
from tandem.runtime.event_plane.zmq_publisher import replay
from tandem.runtime.request_plane import RequestPlaneClient


class KvEventFollower(KvEventFollowerCore):
    transport = "zmq"

    def __init__(self, card: WorkerCard, indexer: KvIndexer, client: RequestPlaneClient) -> None:
        super().__init__(card, indexer, client)
        self._socket: zmq.asyncio.Socket | None = None

    def start(self) -> None:
        ctx = zmq.asyncio.Context.instance()
        self._socket = ctx.socket(zmq.SUB)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.SUBSCRIBE, b"")
        assert self.card.kv_events_address is not None
        self._socket.connect(self.card.kv_events_address)
        super().start()

    async def _close(self) -> None:
        if self._socket is not None:
            self._socket.close()

    async def _run(self) -> None:
        assert self._socket is not None
        await asyncio.sleep(0.05)  # let the subscription reach the publisher before the dump
        await self._dump()
        while True:
            frames = await self._socket.recv_multipart()
            try:
                seq = SEQ_FRAME.unpack(frames[1])[0]
                payload = frames[2]
            except (IndexError, struct.error):
                self.stats.malformed += 1
                continue
            await self._receive(seq, payload)

    async def _replay(self, want: int, until: int) -> list[tuple[int, bytes]]:
        address = self.card.kv_replay_address
        if address is None:
            return []
        try:
            return await asyncio.to_thread(replay, address, want)
        except TimeoutError as exc:
            self.stats.error(str(exc))
            return []
