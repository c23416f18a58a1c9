"""Flags every long-running command shares: where discovery lives and which event plane carries
KV events (``tandem worker``, ``tandem frontend``, ``tandem router``)."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from tandem.runtime.event_plane.config import (
    DEFAULT_NAMESPACE,
    DEFAULT_NATS_URL,
    EVENT_PLANES,
    EventPlaneConfig,
)

if TYPE_CHECKING:
    from tandem.runtime.discovery.base import Discovery

DEFAULT_ETCD_ENDPOINTS = "127.0.0.1:2379"


def add_discovery_args(parser: argparse.ArgumentParser) -> None:
    """``--discovery``, ``--etcd-endpoints`` and ``--namespace``."""
    group = parser.add_argument_group("discovery")
    group.add_argument(
        "--discovery",
        default="file",
        help="where workers register: file (this machine, the default), file:/dir, memory, "
        "etcd (with --etcd-endpoints) or etcd://host:port[,host:port]",
    )
    group.add_argument(
        "--etcd-endpoints",
        default=os.environ.get("TANDEM_ETCD_ENDPOINTS", DEFAULT_ETCD_ENDPOINTS),
        help="etcd: comma-separated host:port list (default: $TANDEM_ETCD_ENDPOINTS or %(default)s)",
    )
    group.add_argument(
        "--namespace",
        default=os.environ.get("TANDEM_NAMESPACE", DEFAULT_NAMESPACE),
        help="etcd keys and NATS subjects are scoped by this (default: $TANDEM_NAMESPACE or %(default)s)",
    )


def add_event_plane_args(parser: argparse.ArgumentParser) -> None:
    """``--event-plane`` and ``--nats-url`` (``--namespace`` comes with the discovery flags)."""
    group = parser.add_argument_group("event plane")
    group.add_argument(
        "--event-plane",
        choices=EVENT_PLANES,
        default="zmq",
        help="how KV events reach routers: zmq (per-worker sockets, default) or nats (JetStream, "
        "replayable, shared by router replicas)",
    )
    group.add_argument(
        "--nats-url",
        default=os.environ.get("TANDEM_NATS_URL", DEFAULT_NATS_URL),
        help="nats: server URL(s), comma-separated (default: $TANDEM_NATS_URL or %(default)s)",
    )


def discovery_from_args(args: argparse.Namespace, ttl_s: float | None = None) -> Discovery:
    """The discovery client the flags describe (``ttl_s``: lease TTL of this process's registrations)."""
    from tandem.runtime.discovery import make_discovery
    from tandem.runtime.discovery.base import DiscoveryConfig

    config = DiscoveryConfig(ttl_s=ttl_s) if ttl_s is not None else DiscoveryConfig()
    return make_discovery(args.discovery, config, etcd_endpoints=args.etcd_endpoints, namespace=args.namespace)


def event_plane_from_args(args: argparse.Namespace) -> EventPlaneConfig:
    return EventPlaneConfig(kind=args.event_plane, nats_url=args.nats_url, namespace=args.namespace)
