"""vLLM's KV event stream, relayed into a Tandem publisher.

vLLM's ZMQ publisher (in its engine-core process) *binds* only wildcard and ipc endpoints; given
``tcp://127.0.0.1:P`` it *connects* its PUB socket there. So the relay binds a SUB socket on the
worker's own address and vLLM connects to it. Each batch is decoded (vLLM's map-shaped events,
digests turned into 64-bit ids) and handed to the sink, Tandem's ZMQ or NATS publisher, with the
relay's own consecutive sequence numbers: the router then follows a vLLM worker exactly like a
builtin one (replay and dump come from the Tandem publisher, which keeps both).

The relay is created once vLLM has started (its endpoints are chosen before, see
`VllmEngine.start`); ZMQ retries vLLM's connect until the SUB socket is there.

A gap in vLLM's own sequence numbers (a batch lost between the two processes) is filled from
vLLM's replay endpoint; if that fails, the relay publishes ``AllBlocksCleared`` so the router
drops this worker's entries rather than keep wrong ones (vLLM announces every block a request
uses again, since the worker asks for ``kv_cache_report_mode: full``).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable

import msgspec
import zmq

from tandem.protocols.kv_events import SEQ_FRAME, AllBlocksCleared, KVEventBatch, decode_batch, make_batch
from tandem.runtime.event_plane.zmq_publisher import replay

logger = logging.getLogger(__name__)

KvEventSink = Callable[[int, KVEventBatch], None]


def free_tcp_port(host: str) -> int:
    """A port free on ``host`` now (vLLM needs its endpoints before the relay can bind them)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


class VllmKvEventRelay:
    """Receives vLLM's batches on ``events_endpoint`` and calls ``sink(seq, batch)`` for each."""

    def __init__(self, events_endpoint: str, replay_endpoint: str, sink: KvEventSink) -> None:
        self.events_endpoint, self.replay_endpoint = events_endpoint, replay_endpoint
        self.sink = sink
        self.batches_relayed = 0
        self.gaps_replayed = 0
        self.gaps_cleared = 0
        self._next_vllm_seq = 0
        self._seq = 0
        self._ctx = zmq.Context()  # its own context: never shared with vLLM's processes
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.bind(events_endpoint)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tandem-vllm-kv-relay", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=2)
        self._sub.close()
        self._ctx.term()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sub, zmq.POLLIN)
        while not self._closed.is_set():
            try:
                if not poller.poll(100):
                    continue
                frames = self._sub.recv_multipart()
            except zmq.ZMQError:
                return
            try:
                self._on_frames(frames)
            except Exception:  # a bad batch must not stop the relay
                logger.exception("vLLM KV event batch could not be relayed")

    def _on_frames(self, frames: list[bytes]) -> None:
        if len(frames) != 3 or len(frames[1]) != SEQ_FRAME.size:
            logger.warning("ignoring a malformed vLLM KV event message (%d frames)", len(frames))
            return
        vllm_seq = SEQ_FRAME.unpack(frames[1])[0]
        if vllm_seq < self._next_vllm_seq:
            return  # already relayed (a replay overlapped the live stream)
        if vllm_seq > self._next_vllm_seq:
            self._fill_gap(vllm_seq)
        self._relay(vllm_seq, frames[2])

    def _fill_gap(self, upto: int) -> None:
        missing = (self._next_vllm_seq, upto)
        try:
            batches = replay(self.replay_endpoint, self._next_vllm_seq, timeout_s=2.0)
        except (TimeoutError, ValueError, zmq.ZMQError) as exc:
            batches, reason = [], repr(exc)
        else:
            reason = "the replay did not cover it"
        wanted = [(seq, payload) for seq, payload in batches if self._next_vllm_seq <= seq < upto]
        if [seq for seq, _ in wanted] == list(range(self._next_vllm_seq, upto)):
            for seq, payload in wanted:
                self._relay(seq, payload)
            self.gaps_replayed += 1
            return
        logger.warning("vLLM KV events %d..%d lost (%s); clearing this worker's index entries", *missing, reason)
        self.gaps_cleared += 1
        self._emit(make_batch([AllBlocksCleared()]))
        self._next_vllm_seq = upto

    def _relay(self, vllm_seq: int, payload: bytes) -> None:
        self._next_vllm_seq = vllm_seq + 1
        try:
            batch = decode_batch(payload)
        except msgspec.DecodeError as exc:  # its blocks cannot be indexed: drop the rest too
            logger.warning(
                "undecodable vLLM KV event batch %d (%s); clearing this worker's index entries", vllm_seq, exc
            )
            batch = make_batch([AllBlocksCleared()])
        self._emit(batch)

    def _emit(self, batch: KVEventBatch) -> None:
        try:
            self.sink(self._seq, batch)
        finally:  # a batch the sink failed on leaves a gap the router sees and recovers from
            self._seq += 1
        self.batches_relayed += 1
