"""Build the KV event publisher ``tandem worker``'s flags ask for (``--event-plane zmq|nats``)."""

from __future__ import annotations

import argparse
import os
import socket
import uuid
from dataclasses import asdict
from typing import Any

from tandem.cli.runtime_args import event_plane_from_args
from tandem.worker.kv_publisher import KvEventPublisher, PublisherConfig


def make_kv_publisher(args: argparse.Namespace, index: int) -> Any:
    """The publisher of the ``index``-th engine of this process (several with ``--mocker-workers``).

    ZMQ: a ``KvEventPublisher`` bound on ``--host`` (``--kv-events-port``/``--kv-replay-port`` for
    the first engine). NATS: a ``NatsKvEventPublisher`` whose ``worker_id`` the worker must use."""
    plane = event_plane_from_args(args)
    if plane.kind == "nats":
        if args.kv_events_port or args.kv_replay_port:
            raise SystemExit("error: --kv-events-port and --kv-replay-port are for --event-plane zmq; "
                             "with nats the events go to the NATS server at --nats-url")
        from tandem.worker.kv_publisher_nats import NatsKvEventPublisher, NatsPublisherConfig

        # Unique per process start: a restarted container may reuse hostname and pid, and must
        # neither collide with its predecessor's unexpired lease nor continue its event history.
        worker_id = f"{socket.gethostname()}-{os.getpid()}-{index}-{uuid.uuid4().hex[:6]}"
        return NatsKvEventPublisher(worker_id, NatsPublisherConfig(url=plane.nats_url, namespace=plane.namespace))
    ports = (args.kv_events_port, args.kv_replay_port) if index == 0 else (0, 0)
    return KvEventPublisher(PublisherConfig(host=args.host, port=ports[0], replay_port=ports[1]))


def attach_engine(publisher: Any, engine: Any) -> None:
    """Let a publisher that sends load metrics read them from ``engine`` (an AsyncEngine)."""
    if hasattr(publisher, "load_source"):
        publisher.load_source = lambda: asdict(engine.stats())
