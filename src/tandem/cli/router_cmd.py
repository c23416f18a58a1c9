"""``tandem router``: a standalone KV-aware router that several frontends share.

Start it with the workers' discovery, then point frontends at it:
``tandem frontend --router remote --router-address HOST:PORT``. Workers started with
``--event-plane nats`` are followed through NATS JetStream (``--nats-url``; without
``--event-plane nats`` the server in their cards), so several router replicas see the same
events and one that restarts replays what it missed.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import TYPE_CHECKING

from tandem.cli.runtime_args import add_discovery_args, add_event_plane_args, discovery_from_args
from tandem.cli.signals import stop_event

if TYPE_CHECKING:
    from tandem.router.policies.kv import KvRouterConfig


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from tandem.router.kv.cost import KvCostConfig

    parser = subparsers.add_parser("router", help="a standalone KV-aware router shared by frontends")
    add_discovery_args(parser)
    add_event_plane_args(parser)
    parser.add_argument("--host", default="127.0.0.1", help="request-plane bind address (default: %(default)s)")
    parser.add_argument("--port", type=int, default=0, help="request-plane port (0: a free one)")
    parser.add_argument("--policy", choices=("kv", "least-loaded"), default="kv")
    d = KvCostConfig()
    parser.add_argument(
        "--kv-overlap-credit",
        type=float,
        default=d.overlap_credit,
        help="weight of a cached block against a prefill block (default: %(default)s)",
    )
    parser.add_argument(
        "--kv-prefill-load-scale",
        type=float,
        default=d.prefill_load_scale,
        help="weight of prefill work against decode blocks (default: %(default)s; Dynamo: 1.0)",
    )
    parser.add_argument(
        "--kv-host-credit",
        type=float,
        default=d.host_credit,
        help="weight of a cached block found only in a worker's host memory tier (G2) against one "
        "in its pool (default: %(default)s; Dynamo's)",
    )
    parser.add_argument(
        "--kv-disk-credit",
        type=float,
        default=d.disk_credit,
        help="weight of a cached block found only in a worker's disk tier (G3) (default: %(default)s; Dynamo's)",
    )
    parser.add_argument(
        "--kv-temperature",
        type=float,
        default=d.temperature,
        help="0 = cheapest worker; > 0 = softmax sampling (default: %(default)s)",
    )
    parser.add_argument("--no-kv-events", action="store_true", help="index own decisions with a TTL instead")
    parser.add_argument(
        "--no-replica-sync",
        action="store_true",
        help="NATS workers: do not share load bookings with the namespace's other routers "
        "(each replica then sees only the requests it routed)",
    )
    parser.set_defaults(func=run)


def router_config_from_args(args: argparse.Namespace) -> KvRouterConfig:
    """The KV policy's config from the ``tandem router`` flags."""
    from tandem.router.policies.kv import KvRouterConfig

    return KvRouterConfig(
        overlap_credit=args.kv_overlap_credit,
        prefill_load_scale=args.kv_prefill_load_scale,
        host_credit=args.kv_host_credit,
        disk_credit=args.kv_disk_credit,
        temperature=args.kv_temperature,
        use_kv_events=not args.no_kv_events,
        nats_url=args.nats_url if args.event_plane == "nats" else None,
        replica_sync=not args.no_replica_sync,
    )


async def serve(args: argparse.Namespace) -> None:
    from tandem.router.router_service import RouterService

    config = router_config_from_args(args)
    service = RouterService(
        discovery_from_args(args), policy=args.policy, config=config, host=args.host, port=args.port
    )
    stop = stop_event()
    await service.start()
    print(f"router ({args.policy}) listening on {service.address}", flush=True)
    await stop.wait()
    await service.stop()


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(args))
    return 0
