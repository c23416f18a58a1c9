"""The worker's KV event publisher: vLLM's ZMQ wire format, a replay endpoint, and dumps.

* **PUB** socket: every engine step that changed the prefix cache is sent as the frames
  ``[topic, seq (8-byte big-endian), msgpack(KVEventBatch)]``; ``seq`` counts 0, 1, 2, ... per
  engine, so a subscriber sees a gap when it misses a batch.
* **Replay** (ROUTER socket, vLLM's protocol): a client sends ``seq`` as 8 big-endian bytes and
  gets back every buffered batch from that number on as ``[b"", seq, payload]`` frames, then an
  end marker with seq −1 and an empty payload. The buffer keeps the latest ``buffer_size``
  batches; older ones need a dump.
* **Dump**: the blocks the worker holds right now, in every tier its events name (``medium``:
  the pool, host memory, disk), as ``BlockStored`` events whose parents come first, plus the seq
  they are current as of. The publisher keeps this table by applying its own events (the
  engine's pool does not keep tokens per block).

Sockets bind to the host given (127.0.0.1 by default), never silently to all interfaces.
``publish`` runs on the engine thread (the only user of the PUB socket); the replay thread owns
the ROUTER socket; the shared buffer and table are guarded by one lock.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass

import zmq

from tandem.protocols.kv_events import (
    END_OF_REPLAY,
    SEQ_FRAME,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    encode_batch,
)

logger = logging.getLogger(__name__)

"""The sequence-number frame: a signed 64-bit big-endian integer (vLLM's format)."""


@dataclass(frozen=True)
class PublisherConfig:
    host: str = "127.0.0.1"
    """Bind address of both sockets."""
    port: int = 0
    """PUB port (0: a free one)."""
    replay_port: int = 0
    """Replay (ROUTER) port (0: a free one)."""
    topic: bytes = b"kv-events"
    buffer_size: int = 10_000
    """Batches kept for replay."""


BlockKey = tuple[str, int]
"""A block in a ``BlockTable``: (its medium, upper-case, ``GPU`` for None; its engine hash)."""


@dataclass(frozen=True, slots=True)
class HeldBlock:
    parent: int | None
    """The engine hash of the block before it (in whichever tier holds that one)."""
    tokens: list[int]
    block_size: int
    medium: str | None
    """The medium as the event named it (repeated in the dump)."""


def medium_key(medium: str | None) -> str:
    """A medium as the table keys it: the engine's pool (None) is ``GPU``; case does not count."""
    return "GPU" if medium is None else medium.upper()


class BlockTable:
    """The blocks a worker holds, per medium, kept by applying its events.

    A block can be held in several tiers at once (the pool and a write-through copy in host
    memory), so entries are keyed by (medium, engine hash): ``BlockRemoved`` drops the block from
    the medium it names only; ``AllBlocksCleared`` drops everything.
    """

    def __init__(self) -> None:
        self.blocks: OrderedDict[BlockKey, HeldBlock] = OrderedDict()
        self._mediums: dict[str, None] = {}  # every medium key seen (a handful), in order

    def apply(self, batch: KVEventBatch) -> None:
        for event in batch.events:
            if isinstance(event, BlockStored):
                medium, parent, size = medium_key(event.medium), event.parent_block_hash, event.block_size
                self._mediums.setdefault(medium)
                for i, block_hash in enumerate(event.block_hashes):
                    tokens = list(event.token_ids[i * size : (i + 1) * size])
                    self.blocks[(medium, block_hash)] = HeldBlock(parent, tokens, size, event.medium)
                    parent = block_hash
            elif isinstance(event, BlockRemoved):
                medium = medium_key(event.medium)
                for block_hash in event.block_hashes:
                    self.blocks.pop((medium, block_hash), None)
            elif isinstance(event, AllBlocksCleared):
                self.blocks.clear()

    def as_events(self) -> list[BlockStored]:
        """One BlockStored per block (with its medium), each parent before its children: a block
        offloaded to another tier after its parent left the pool would otherwise come first."""
        events: list[BlockStored] = []
        done: set[BlockKey] = set()
        for key in self.blocks:
            chain: list[BlockKey] = []
            at: BlockKey | None = key
            while at is not None and at not in done:
                done.add(at)
                chain.append(at)
                at = self._parent_key(at)
            for medium_and_hash in reversed(chain):
                block = self.blocks[medium_and_hash]
                events.append(
                    BlockStored(
                        block_hashes=[medium_and_hash[1]],
                        parent_block_hash=block.parent,
                        token_ids=block.tokens,
                        block_size=block.block_size,
                        medium=block.medium,
                    )
                )
        return events

    def _parent_key(self, key: BlockKey) -> BlockKey | None:
        """Where the table holds a block's parent: in the block's medium, else in another; None
        when it holds none (a root, or a parent no tier holds any more)."""
        parent = self.blocks[key].parent
        if parent is None:
            return None
        if (key[0], parent) in self.blocks:
            return key[0], parent
        return next(((m, parent) for m in self._mediums if (m, parent) in self.blocks), None)


class KvEventPublisher:
    def __init__(self, config: PublisherConfig | None = None) -> None:
        self.config = config or PublisherConfig()
        self._ctx: zmq.SyncContext = zmq.Context.instance()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._replay = self._ctx.socket(zmq.ROUTER)
        self._replay.setsockopt(zmq.LINGER, 0)
        self.address = _bind(self._pub, self.config.host, self.config.port)
        self.replay_address = _bind(self._replay, self.config.host, self.config.replay_port)
        self._lock = threading.Lock()
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=self.config.buffer_size)
        self._table = BlockTable()
        self.last_seq = -1
        self.batches_published = 0
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._serve_replay, name="tandem-kv-replay", daemon=True)
        self._thread.start()

    def publish(self, seq: int, batch: KVEventBatch) -> None:
        """Send one batch (called on the engine thread, as AsyncEngine's kv_event_sink)."""
        payload = encode_batch(batch)
        with self._lock:
            self._buffer.append((seq, payload))
            self._table.apply(batch)
            self.last_seq = seq
            self.batches_published += 1
        try:
            self._pub.send_multipart([self.config.topic, SEQ_FRAME.pack(seq), payload], flags=zmq.NOBLOCK)
        except zmq.Again:  # no room in the send queue: subscribers recover through replay
            logger.warning("KV event batch %d dropped by the PUB socket (send queue full)", seq)

    def dump(self) -> tuple[int, list[BlockStored]]:
        """(seq the dump is current as of, the blocks held now as BlockStored events)."""
        with self._lock:
            return self.last_seq, self._table.as_events()

    def _serve_replay(self) -> None:
        poller = zmq.Poller()
        poller.register(self._replay, zmq.POLLIN)
        while not self._closed.is_set():
            try:
                if not poller.poll(100):
                    continue
                frames = self._replay.recv_multipart()
            except zmq.ZMQError:
                return
            identity, start = frames[0], _parse_seq(frames[-1])
            with self._lock:
                batches = [(seq, payload) for seq, payload in self._buffer if start is not None and seq >= start]
            try:
                for seq, payload in batches:
                    self._replay.send_multipart([identity, b"", SEQ_FRAME.pack(seq), payload])
                self._replay.send_multipart([identity, b"", SEQ_FRAME.pack(END_OF_REPLAY), b""])
            except zmq.ZMQError:
                continue

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=2)
        self._pub.close()
        self._replay.close()


def _parse_seq(frame: bytes) -> int | None:
    return SEQ_FRAME.unpack(frame)[0] if len(frame) == SEQ_FRAME.size else None


def _bind(socket: zmq.SyncSocket, host: str, port: int) -> str:
    if port:
        address = f"tcp://{host}:{port}"
        socket.bind(address)
        return address
    bound = socket.bind_to_random_port(f"tcp://{host}")
    return f"tcp://{host}:{bound}"


def replay(address: str, start_seq: int, timeout_s: float = 5.0) -> list[tuple[int, bytes]]:
    """Ask a publisher's replay endpoint for every buffered batch from ``start_seq`` on.

    Replies are ``[empty, seq, payload]`` (Tandem) or ``[empty, topic, seq, payload]`` (vLLM since
    it added the topic); both end with seq -1."""
    ctx: zmq.SyncContext = zmq.Context.instance()
    socket = ctx.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.RCVTIMEO, int(timeout_s * 1000))
    socket.connect(address)
    try:
        socket.send_multipart([b"", SEQ_FRAME.pack(start_seq)])
        batches: list[tuple[int, bytes]] = []
        while True:
            frames = socket.recv_multipart()
            if len(frames) not in (3, 4):
                raise ValueError(f"malformed replay reply from {address}: {len(frames)} frames")
            seq_frame, payload = frames[-2], frames[-1]
            seq = SEQ_FRAME.unpack(seq_frame)[0]
            if seq == END_OF_REPLAY:
                return batches
            batches.append((seq, payload))
    except zmq.Again:
        raise TimeoutError(f"no replay from {address} within {timeout_s}s") from None
    finally:
        socket.close()
