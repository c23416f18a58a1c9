"""`VllmKvEventRelay` against real ZMQ sockets standing in for vLLM's publisher: a PUB connected
to the relay's bound SUB sends vLLM's frames ``[topic, seq, payload]`` with map-shaped payloads,
and a ROUTER answers vLLM's replay protocol. The sink gets decoded batches numbered 0, 1, 2, ...
by the relay; a gap is filled from the replay endpoint in order, or (replay unreachable, partial
or malformed) replaced by one AllBlocksCleared batch; an undecodable payload becomes
AllBlocksCleared; older (duplicate) seqs and malformed messages are dropped."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import msgspec
import pytest
import zmq
from tests.support import free_port, poll_until
from tests.vllm_samples import VLLM_032_BATCH

from tandem.engine.vllm.kv_relay import VllmKvEventRelay, free_tcp_port
from tandem.protocols.kv_events import (
    END_OF_REPLAY,
    SEQ_FRAME,
    AllBlocksCleared,
    BlockStored,
    KVEventBatch,
    decode_batch,
)

TOPIC = b""  # vLLM's default topic
CLEARED = [AllBlocksCleared()]


def vllm_payload(n: int) -> bytes:
    """A batch as vLLM 0.32 encodes it (map-shaped events, a 32-byte digest as a block hash)."""
    stored = {
        "type": "BlockStored",
        "block_hashes": [n.to_bytes(32, "big"), 1000 + n],
        "parent_block_hash": None,
        "token_ids": list(range(n, n + 32)),
        "block_size": 16,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
        "extra_keys": None,
        "group_idx": 0,
    }
    return msgspec.msgpack.encode([float(n), [stored], None])


def stored_hashes(batch: KVEventBatch) -> list[int]:
    (event,) = batch.events
    assert isinstance(event, BlockStored)
    return event.block_hashes


class Sink:
    """The relay's sink (called on the relay's thread): every (seq, batch) it got."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._got: list[tuple[int, KVEventBatch]] = []

    def __call__(self, seq: int, batch: KVEventBatch) -> None:
        with self._lock:
            self._got.append((seq, batch))

    @property
    def got(self) -> list[tuple[int, KVEventBatch]]:
        with self._lock:
            return list(self._got)

    def wait_for(self, count: int, timeout: float = 5.0) -> list[tuple[int, KVEventBatch]]:
        poll_until(lambda: len(self.got) >= count, timeout, interval=0.005, what=f"{count} relayed batches")
        return self.got


class VllmPublisher:
    """vLLM's side of the stream: a PUB socket that *connects* to the relay's bound SUB."""

    def __init__(self, endpoint: str) -> None:
        self._ctx = zmq.Context()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.connect(endpoint)

    def send(self, seq: int, payload: bytes) -> None:
        self._pub.send_multipart([TOPIC, SEQ_FRAME.pack(seq), payload])

    def send_frames(self, frames: list[bytes]) -> None:
        self._pub.send_multipart(frames)

    def close(self) -> None:
        self._pub.close()
        self._ctx.term()


class VllmReplayServer:
    """vLLM's replay endpoint: a ROUTER answering ``[id, b"", seq]`` with every buffered batch from
    ``seq`` on as ``[id, b"", topic, seq, payload]``, then ``[id, b"", b"", -1, b""]``."""

    def __init__(self, buffer: dict[int, bytes], malformed: bool = False) -> None:
        self.buffer, self.malformed = buffer, malformed
        self.requests: list[int] = []
        self._ctx = zmq.Context()
        self._router = self._ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self.address = f"tcp://127.0.0.1:{self._router.bind_to_random_port('tcp://127.0.0.1')}"
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        while not self._closed.is_set():
            if not poller.poll(20):
                continue
            client, _, start_frame = self._router.recv_multipart()
            start = int.from_bytes(start_frame, "big", signed=True)
            self.requests.append(start)
            if self.malformed:
                self._router.send_multipart([client, b"", b"just one frame"])
                continue
            for seq in sorted(self.buffer):
                if seq >= start:
                    self._router.send_multipart([client, b"", TOPIC, SEQ_FRAME.pack(seq), self.buffer[seq]])
            self._router.send_multipart([client, b"", b"", SEQ_FRAME.pack(END_OF_REPLAY), b""])

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=2)
        self._router.close()
        self._ctx.term()


@dataclass
class Stream:
    relay: VllmKvEventRelay
    vllm: VllmPublisher
    sink: Sink

    def connect(self) -> None:
        """Beat ZMQ's slow joiner: send vLLM's batch 0 until the relay has it (the repeats are
        older seqs by then, and dropped), so that every later send arrives."""

        def probe() -> bool:
            self.vllm.send(0, vllm_payload(0))
            return len(self.sink.got) > 0

        poll_until(probe, timeout=5, interval=0.01, what="the relay's first batch")
        time.sleep(0.05)  # let the last probes arrive (and be dropped) before the test counts


def open_stream(replay_endpoint: str) -> tuple[VllmKvEventRelay, VllmPublisher, Sink]:
    sink = Sink()
    events = f"tcp://127.0.0.1:{free_port()}"
    relay = VllmKvEventRelay(events, replay_endpoint, sink)
    return relay, VllmPublisher(events), sink


@pytest.fixture
def replay_server() -> Iterator[VllmReplayServer]:
    server = VllmReplayServer({seq: vllm_payload(seq) for seq in range(10)})
    try:
        yield server
    finally:
        server.close()


@contextlib.contextmanager
def connected_stream(replay_endpoint: str) -> Iterator[Stream]:
    """A relay with vLLM's PUB connected to it and vLLM's batch 0 relayed; closed on exit."""
    relay, vllm, sink = open_stream(replay_endpoint)
    try:
        stream = Stream(relay, vllm, sink)
        stream.connect()
        yield stream
    finally:
        vllm.close()
        relay.close()


@pytest.fixture
def stream(replay_server: VllmReplayServer) -> Iterator[Stream]:
    """A connected relay whose replay endpoint holds vLLM's batches 0-9; batch 0 already relayed."""
    with connected_stream(replay_server.address) as connected:
        yield connected


@pytest.fixture
def stream_without_replay() -> Iterator[Stream]:
    """A connected relay whose replay endpoint nobody serves (a replay times out after 2 s)."""
    with connected_stream(f"tcp://127.0.0.1:{free_port()}") as connected:
        yield connected


def test_batches_are_decoded_and_renumbered_consecutively(stream: Stream) -> None:
    stream.vllm.send(1, vllm_payload(1))
    stream.vllm.send(2, VLLM_032_BATCH)
    got = stream.sink.wait_for(3)
    assert [seq for seq, _ in got] == [0, 1, 2]
    assert [batch for _, batch in got] == [
        decode_batch(vllm_payload(0)),
        decode_batch(vllm_payload(1)),
        decode_batch(VLLM_032_BATCH),
    ]
    # vLLM's 32-byte digests became 64-bit ids (the low 8 bytes).
    assert stored_hashes(got[1][1]) == [1, 1001]
    assert stream.relay.batches_relayed == 3
    assert (stream.relay.gaps_replayed, stream.relay.gaps_cleared) == (0, 0)


def test_older_seqs_are_dropped(stream: Stream) -> None:
    for seq in (1, 2, 1, 0, 2, 3):
        stream.vllm.send(seq, vllm_payload(seq))
    stream.sink.wait_for(4)
    time.sleep(0.1)  # room for a wrongly relayed duplicate to show up
    got = stream.sink.got
    assert [seq for seq, _ in got] == [0, 1, 2, 3]
    assert [stored_hashes(batch)[1] for _, batch in got] == [1000, 1001, 1002, 1003]


def test_a_gap_is_filled_from_the_replay_endpoint_in_order(stream: Stream, replay_server: VllmReplayServer) -> None:
    stream.vllm.send(4, vllm_payload(4))  # vLLM's 1-3 were lost between the processes
    got = stream.sink.wait_for(5)
    assert replay_server.requests == [1]  # asked from the first missing seq
    assert [seq for seq, _ in got] == [0, 1, 2, 3, 4]
    assert [batch for _, batch in got] == [decode_batch(vllm_payload(n)) for n in range(5)]
    assert (stream.relay.gaps_replayed, stream.relay.gaps_cleared) == (1, 0)
    stream.vllm.send(5, vllm_payload(5))  # and the live stream goes on from there
    assert stream.sink.wait_for(6)[5] == (5, decode_batch(vllm_payload(5)))


def test_a_gap_the_replay_does_not_cover_clears_the_workers_entries(replay_server: VllmReplayServer) -> None:
    del replay_server.buffer[2]  # the replay has 1 and 3, not 2
    _through_gap(replay_server.address)
    assert replay_server.requests == [1]


def test_a_malformed_replay_answer_clears_the_workers_entries() -> None:
    server = VllmReplayServer({}, malformed=True)
    try:
        _through_gap(server.address)
        assert server.requests == [1]
    finally:
        server.close()


def test_an_unreachable_replay_endpoint_clears_the_workers_entries_and_goes_on(stream_without_replay: Stream) -> None:
    stream = stream_without_replay
    start = time.monotonic()
    stream.vllm.send(3, vllm_payload(3))
    got = stream.sink.wait_for(3, timeout=10)
    assert time.monotonic() - start < 5  # the replay gave up after its 2 s timeout
    assert [seq for seq, _ in got] == [0, 1, 2]
    assert got[1][1].events == CLEARED
    assert got[2][1] == decode_batch(vllm_payload(3))
    assert (stream.relay.gaps_replayed, stream.relay.gaps_cleared) == (0, 1)
    stream.vllm.send(4, vllm_payload(4))
    assert stream.sink.wait_for(4)[3] == (3, decode_batch(vllm_payload(4)))


def _through_gap(replay_endpoint: str) -> None:
    """Relay 0, then 4 (1-3 missing) and 5 where replaying 1-3 fails: 0, AllBlocksCleared, 4, 5."""
    with connected_stream(replay_endpoint) as stream:
        stream.vllm.send(4, vllm_payload(4))
        stream.vllm.send(5, vllm_payload(5))
        got = stream.sink.wait_for(4)
        assert [seq for seq, _ in got] == [0, 1, 2, 3]
        assert got[1][1].events == CLEARED
        assert [got[2][1], got[3][1]] == [decode_batch(vllm_payload(4)), decode_batch(vllm_payload(5))]
        assert (stream.relay.gaps_replayed, stream.relay.gaps_cleared) == (0, 1)


def test_an_undecodable_batch_becomes_all_blocks_cleared(stream: Stream) -> None:
    stream.vllm.send(1, b"\xc1 not msgpack")
    stream.vllm.send(2, msgspec.msgpack.encode([1.0, [{"type": "BlockEvicted", "block_hashes": []}], None]))
    stream.vllm.send(3, vllm_payload(3))
    got = stream.sink.wait_for(4)
    assert [seq for seq, _ in got] == [0, 1, 2, 3]
    assert got[1][1].events == CLEARED and got[2][1].events == CLEARED
    assert got[3][1] == decode_batch(vllm_payload(3))
    assert (stream.relay.gaps_replayed, stream.relay.gaps_cleared) == (0, 0)  # not gaps: no replay asked


def test_malformed_messages_are_ignored(stream: Stream, replay_server: VllmReplayServer) -> None:
    stream.vllm.send_frames([TOPIC, SEQ_FRAME.pack(1)])  # no payload
    stream.vllm.send_frames([TOPIC, b"\x01", vllm_payload(1)])  # a seq frame of the wrong size
    stream.vllm.send_frames([TOPIC, SEQ_FRAME.pack(1), vllm_payload(1), b"extra"])
    stream.vllm.send(1, vllm_payload(1))
    got = stream.sink.wait_for(2)
    time.sleep(0.05)
    assert stream.sink.got == got and [seq for seq, _ in got] == [0, 1]
    assert got[1][1] == decode_batch(vllm_payload(1))
    assert replay_server.requests == []


def test_a_sink_that_raises_does_not_stop_the_relay() -> None:
    calls: list[KVEventBatch] = []

    def flaky(seq: int, batch: KVEventBatch) -> None:
        calls.append(batch)
        if len(calls) == 2:
            raise RuntimeError("sink failure")

    events = f"tcp://127.0.0.1:{free_port()}"
    relay = VllmKvEventRelay(events, f"tcp://127.0.0.1:{free_port()}", flaky)
    vllm = VllmPublisher(events)
    try:

        def probe() -> bool:
            vllm.send(0, vllm_payload(0))
            return bool(calls)

        poll_until(probe, timeout=5, interval=0.01)
        time.sleep(0.05)
        vllm.send(1, vllm_payload(1))
        vllm.send(2, vllm_payload(2))
        poll_until(lambda: len(calls) >= 3, timeout=5)
        assert calls[:3] == [decode_batch(vllm_payload(n)) for n in range(3)]
        assert relay.gaps_cleared == 0  # vLLM's seqs stay consecutive: the failed batch was consumed
    finally:
        vllm.close()
        relay.close()


def test_close_stops_the_relay_thread_and_frees_its_endpoint() -> None:
    events = f"tcp://127.0.0.1:{free_port()}"
    relay = VllmKvEventRelay(events, f"tcp://127.0.0.1:{free_port()}", Sink())
    relay.close()
    assert not relay._thread.is_alive()
    port = int(events.rsplit(":", 1)[1])
    with socket.socket() as probe:  # the SUB socket's port can be bound again
        probe.bind(("127.0.0.1", port))


def test_free_tcp_port_gives_a_bindable_port() -> None:
    port = free_tcp_port("127.0.0.1")
    assert 0 < port < 65536
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))
