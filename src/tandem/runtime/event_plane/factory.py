"""Build a worker's KV event publisher for the configured event plane (ZMQ or NATS)."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable
from typing import Any

import msgspec

from tandem.protocols.endpoints import EngineStats
from tandem.runtime.event_plane.config import EventPlaneConfig
from tandem.runtime.event_plane.zmq_publisher import KvEventPublisher, PublisherConfig


def make_kv_publisher(
    plane: EventPlaneConfig, index: int, *, host: str = "127.0.0.1", events_port: int = 0, replay_port: int = 0
) -> Any:
    """The publisher of a process's ``index``-th engine (several with ``--mocker-workers``).

    ZMQ: a ``KvEventPublisher`` bound on ``host`` (``events_port``/``replay_port`` for the first
    engine; 0 picks free ports). NATS: a ``NatsKvEventPublisher`` whose ``worker_id`` the worker
    must use. Raises ValueError for ports given with NATS (nothing would bind them)."""
    if plane.kind == "nats":
        if events_port or replay_port:
            raise ValueError(
                "--kv-events-port and --kv-replay-port are for --event-plane zmq; "
                "with nats the events go to the NATS server at --nats-url"
            )
        from tandem.runtime.event_plane.nats_publisher import NatsKvEventPublisher, NatsPublisherConfig

        # Unique per process start: a restarted container may reuse hostname and pid, and must
        # neither collide with its predecessor's unexpired lease nor continue its event history.
        worker_id = f"{socket.gethostname()}-{os.getpid()}-{index}-{uuid.uuid4().hex[:6]}"
        return NatsKvEventPublisher(worker_id, NatsPublisherConfig(url=plane.nats_url, namespace=plane.namespace))
    ports = (events_port, replay_port) if index == 0 else (0, 0)
    return KvEventPublisher(PublisherConfig(host=host, port=ports[0], replay_port=ports[1]))


def attach_load_source(publisher: Any, stats: Callable[[], EngineStats]) -> None:
    """Let a publisher that sends load metrics (NATS) read them from ``stats``."""
    if hasattr(publisher, "load_source"):
        publisher.load_source = lambda: msgspec.structs.asdict(stats())
