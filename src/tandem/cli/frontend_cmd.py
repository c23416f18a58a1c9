"""``tandem frontend``: the OpenAI HTTP frontend alone, routing to the workers in discovery.

Start workers separately (``tandem worker --discovery file:/dir``) with the same discovery.
Runs until SIGTERM or SIGINT, then lets requests in flight finish for up to ``--drain-timeout``;
exits 130 after SIGINT (Ctrl-C), 0 after SIGTERM. A second signal exits at once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

from tandem.cli.runtime_args import add_discovery_args, add_event_plane_args, discovery_from_args
from tandem.cli.signals import exit_code, stop_event
from tandem.frontend.config import FrontendConfig
from tandem.router.registry import ROUTER_NAMES

_T = TypeVar("_T")


def add_frontend_args(parser: argparse.ArgumentParser, *, defaults: bool = True) -> None:
    """HTTP and routing flags (``defaults=False`` leaves unset flags None, for overriding a graph)."""
    d = FrontendConfig()
    group = parser.add_argument_group("frontend")
    group.add_argument("--host", default=d.host if defaults else None, help=f"HTTP bind address (default: {d.host})")
    group.add_argument("--port", type=int, default=d.port if defaults else None, help=f"HTTP port (default: {d.port})")
    group.add_argument(
        "--router",
        choices=ROUTER_NAMES,
        default=d.router if defaults else None,
        help=f"routing policy (default: {d.router})",
    )
    group.add_argument(
        "--router-address",
        help="remote: host:port of a standalone `tandem router` (default: none; --router remote needs it)",
    )
    group.add_argument(
        "--kv-overlap-credit",
        type=float,
        default=d.kv_overlap_credit if defaults else None,
        help=f"kv: weight of a cached block against a prefill block (default: {d.kv_overlap_credit})",
    )
    group.add_argument(
        "--kv-prefill-load-scale",
        type=float,
        default=d.kv_prefill_load_scale if defaults else None,
        help=f"kv: weight of prefill work against decode blocks (default: {d.kv_prefill_load_scale}; Dynamo: 1.0)",
    )
    group.add_argument(
        "--kv-host-credit",
        type=float,
        default=d.kv_host_credit if defaults else None,
        help=f"kv: credit of a prompt block a worker holds in host memory (default: {d.kv_host_credit}; Dynamo's)",
    )
    group.add_argument(
        "--kv-disk-credit",
        type=float,
        default=d.kv_disk_credit if defaults else None,
        help=f"kv: credit of a prompt block a worker holds on disk (default: {d.kv_disk_credit}; Dynamo's)",
    )
    group.add_argument(
        "--kv-temperature",
        type=float,
        default=d.kv_temperature if defaults else None,
        help=f"kv: 0 = cheapest worker; > 0 = softmax sampling (default: {d.kv_temperature})",
    )
    group.add_argument(
        "--no-kv-events",
        action="store_true",
        help="kv: do not use workers' KV events; index the router's own decisions with a TTL",
    )
    group.add_argument(
        "--max-body-bytes",
        type=int,
        default=d.max_body_bytes if defaults else None,
        help=f"request bodies above this get 413 (default: {d.max_body_bytes})",
    )
    group.add_argument(
        "--default-max-tokens",
        type=int,
        default=None,
        help="completion length when a request gives none (default: up to the context length)",
    )
    group.add_argument(
        "--max-local-prefill-length",
        type=int,
        default=None,
        help="disaggregated serving: prompts up to this many tokens are prefilled on the decode "
        f"worker (default: {d.max_local_prefill_length})",
    )
    group.add_argument(
        "--max-prefill-queue-size",
        type=int,
        default=None,
        help="disaggregated serving: prefill on the decode worker when this many prefill requests "
        f"per prefill worker are already in flight; 0 = never (default: {d.max_prefill_queue_size})",
    )
    group.add_argument(
        "--migration-limit",
        type=int,
        default=None,
        help="times a request may move to another worker when its worker is lost mid-stream; "
        "0 = off (default: 1 when more than one worker serves the model, else 0)",
    )
    group.add_argument("--access-log", action="store_true", help="log every HTTP request")
    group.add_argument(
        "--drain-timeout",
        type=float,
        default=d.drain_timeout_s if defaults else None,
        help="seconds requests in flight get to finish on shutdown (tandem serve: in the "
        "frontend and in the workers); past it, streams end with an error event "
        f"(default: {d.drain_timeout_s})",
    )


# Flags that replace the base config's value only when given (None = not given).
_OVERRIDABLE = (
    "host",
    "port",
    "router",
    "router_address",
    "max_body_bytes",
    "default_max_tokens",
    "kv_overlap_credit",
    "kv_prefill_load_scale",
    "kv_temperature",
    "kv_host_credit",
    "kv_disk_credit",
    "max_local_prefill_length",
    "max_prefill_queue_size",
    "migration_limit",
)


def frontend_config_from_args(args: argparse.Namespace, base: FrontendConfig | None = None) -> FrontendConfig:
    """``base`` (e.g. from a graph) with every flag the user set applied on top."""
    config = base or FrontendConfig()
    for name in _OVERRIDABLE:
        if getattr(args, name) is not None:
            setattr(config, name, getattr(args, name))
    if args.drain_timeout is not None:
        config.drain_timeout_s = args.drain_timeout
    config.kv_events = config.kv_events and not args.no_kv_events
    config.access_log = config.access_log or args.access_log
    config.__post_init__()
    return config


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("frontend", help="the OpenAI HTTP frontend, routing to workers in discovery")
    add_frontend_args(parser)
    add_discovery_args(parser)
    add_event_plane_args(parser)
    parser.set_defaults(func=run)


async def serve(args: argparse.Namespace) -> int:
    from tandem.frontend.server import FrontendServer

    config = frontend_config_from_args(args)
    if args.event_plane == "nats":
        config.nats_url = args.nats_url
    server = FrontendServer(config, discovery_from_args(args))
    stop = stop_event()
    await server.start()
    print(f"frontend listening on {server.url}/v1 (workers from discovery {args.discovery!r})", flush=True)
    await stop.wait()
    await server.stop()
    return exit_code(stop)


def run_event_loop(main: Coroutine[Any, Any, _T]) -> _T:
    """Run ``main`` on uvloop when it is installed (uvicorn[standard] brings it): cheaper socket
    I/O per streamed chunk than the default asyncio loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run_event_loop(serve(args))
    except OSError as exc:
        print(f"error: {exc}")
        return 1
