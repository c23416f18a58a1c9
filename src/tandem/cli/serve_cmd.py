"""``tandem serve [GRAPH]``: a whole deployment on this machine, the OpenAI endpoint in one command.

With no arguments: the frontend on 127.0.0.1:8000 and one builtin worker on the default model
(pulled into the model cache first if needed). A graph YAML (``examples/graphs/agg.yaml``)
declares the components instead; flags given on the command line override it. Ctrl-C stops
everything cleanly: requests in flight get ``--drain-timeout`` to finish (later streams end with
an error event), then the workers drain; exit status 130 (0 after SIGTERM). A second Ctrl-C
kills at once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from tandem.cli.engine_args import add_engine_args
from tandem.cli.frontend_cmd import add_frontend_args, frontend_config_from_args, run_event_loop
from tandem.cli.signals import StopEvent, exit_code
from tandem.runtime.event_plane.config import DEFAULT_NATS_URL, EVENT_PLANES

if TYPE_CHECKING:  # imported lazily at run time, to keep `tandem --help` fast
    from tandem.deploy.graph import Graph
    from tandem.deploy.local import LocalDeployment

# Engine flags forwarded to every worker when the user sets them (argparse dest → worker flag).
_FORWARDED_FLAGS = (
    "dtype",
    "device",
    "threads",
    "kv_cache_gib",
    "num_kv_blocks",
    "block_size",
    "max_num_batched_tokens",
    "max_num_seqs",
    "max_model_len",
    "no_prefix_caching",
    "kv_host_cache_gib",
    "kv_host_cache_shared",
    "kv_disk_cache_gib",
    "kv_disk_cache_dir",
    "kv_offload_policy",
    "kv_disk_min_frequency",
    "speedup_ratio",
)


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("serve", help="serve an OpenAI endpoint: frontend + workers on this machine")
    parser.add_argument("graph", nargs="?", help="deployment graph YAML (default: one builtin worker)")
    parser.add_argument("--workers", type=int, help="number of workers (default: 1, or the graph's)")
    parser.add_argument(
        "--engine", choices=("builtin", "vllm", "mocker"), help="engine of every worker (default: builtin)"
    )
    parser.add_argument(
        "--vllm-arg",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="vllm engine: a vLLM engine argument for every worker (e.g. enforce_eager=true); repeatable (default: none)",
    )
    parser.add_argument(
        "--speedup-ratio",
        type=float,
        default=1.0,
        help="mocker: divide modeled step times by this; 0 = no delay (default: %(default)s)",
    )
    parser.add_argument(
        "--discovery",
        help="discovery spec: file, file:/dir or etcd://host:port[,host:port] "
        "(default: the graph's, else a private directory for this run)",
    )
    parser.add_argument(
        "--event-plane",
        choices=EVENT_PLANES,
        help="how workers send KV events to the router: zmq or nats (default: the graph's, else zmq)",
    )
    parser.add_argument(
        "--nats-url", help=f"nats: server URL(s) (default: the graph's, else $TANDEM_NATS_URL or {DEFAULT_NATS_URL})"
    )
    parser.add_argument(
        "--worker-log-level",
        default="WARNING",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="logging level of the worker processes (default: %(default)s)",
    )
    add_frontend_args(parser, defaults=False)
    add_engine_args(parser)
    parser.set_defaults(func=run, _parser=parser)


def build_graph(args: argparse.Namespace) -> Graph:
    from tandem.deploy.graph import Graph, GraphError, WorkerGroup, load_graph

    parser: argparse.ArgumentParser = args._parser
    graph = load_graph(args.graph) if args.graph else Graph(workers=[WorkerGroup(model=args.model)])
    graph.frontend = frontend_config_from_args(args, graph.frontend)
    if args.workers is not None:
        if len(graph.workers) != 1:
            raise GraphError("--workers needs a graph with exactly one worker group")
        graph.workers[0].count = args.workers
    if args.event_plane is not None or args.nats_url is not None:
        graph.set_event_plane(args.event_plane or graph.event_plane, args.nats_url)
    for group in graph.workers:
        if args.engine is not None:
            group.engine = args.engine
        if args.graph and args.model != parser.get_default("model"):
            group.model = args.model
        for dest in _FORWARDED_FLAGS:
            value = getattr(args, dest)
            if value != parser.get_default(dest):
                group.flags[dest.replace("_", "-")] = value
        if group.engine != "mocker":
            group.flags.pop("speedup-ratio", None)
        if group.vllm and group.engine != "vllm":
            raise GraphError(
                f"the graph gives vLLM engine arguments to {group.engine!r} workers (--engine overrides it)"
            )
        if args.vllm_arg:
            if group.engine != "vllm":
                raise GraphError("--vllm-arg needs --engine vllm (or engine: vllm in the graph)")
            from tandem.engine.vllm.config import parse_vllm_args

            group.vllm.update(parse_vllm_args(args.vllm_arg))
    return graph


def _pull_models(graph: Graph) -> None:
    """Fetch registry models once, here, before several workers would race for them."""
    from tandem.model_cache.registry import find_entry
    from tandem.model_cache.resolve import resolve_model

    for model in sorted({g.model for g in graph.workers}):
        if find_entry(model) is not None:
            resolve_model(model)


async def _serve(args: argparse.Namespace, graph: Graph, discovery: str) -> int:
    from tandem.deploy.local import LocalDeployment

    # One drain timeout for the frontend's requests in flight and for the workers.
    deployment = LocalDeployment(
        graph, discovery, drain_timeout=graph.frontend.drain_timeout_s, worker_log_level=args.worker_log_level
    )
    stop = StopEvent()
    loop = asyncio.get_running_loop()

    def on_signal(sig: int) -> None:
        if stop.is_set():  # second signal: no more waiting
            deployment.kill()
            os._exit(130)
        stop.signal = sig
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    start = asyncio.ensure_future(deployment.start())
    await asyncio.wait({start, asyncio.ensure_future(stop.wait())}, return_when=asyncio.FIRST_COMPLETED)
    if not start.done():
        start.cancel()
    elif start.exception() is not None:
        print(f"error: {start.exception()}", file=sys.stderr, flush=True)
        await deployment.stop()
        return 1
    if not stop.is_set():
        url = deployment.server.url
        print(
            f"Tandem is serving {', '.join(graph.models)} at {url}/v1 "
            f"({deployment.num_workers} worker{'s' * (deployment.num_workers != 1)}, "
            f"router {graph.frontend.router}; ready {_since_launch():.1f}s after launch)",
            flush=True,
        )
        print(
            f"  try: curl {url}/v1/chat/completions -H 'Content-Type: application/json' "
            f'-d \'{{"model": "{graph.models[0]}", "messages": [{{"role": "user", "content": "Hi!"}}]}}\'',
            flush=True,
        )
        print(f"  add workers: tandem worker --discovery {discovery} --model {graph.workers[0].model}", flush=True)
        print("  Ctrl-C stops", flush=True)
        await _watch(deployment, stop)
    print("stopping…", flush=True)
    await deployment.stop()
    return exit_code(stop)


def _since_launch() -> float:
    """Seconds since this process started: Python's imports and a first start's model pull count.
    Linux: from its start time in /proc (clock ticks on the boot clock; psutil's create_time
    rounds the boot time to a second)."""
    try:
        stat = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        return time.clock_gettime(time.CLOCK_BOOTTIME) - int(stat[19]) / os.sysconf("SC_CLK_TCK")  # field 22
    except (OSError, ValueError, IndexError, AttributeError):
        import psutil

        created: float = psutil.Process().create_time()  # seconds since the epoch
        return time.time() - created


async def _watch(deployment: LocalDeployment, stop: asyncio.Event) -> None:
    """Wait for a stop signal; say so when a worker process dies meanwhile."""
    reported: set[int] = set()
    while not stop.is_set():
        for proc in deployment.dead_workers():
            if proc.pid not in reported:
                reported.add(proc.pid)
                print(f"warning: worker process {proc.pid} exited with code {proc.returncode}", flush=True)
        try:
            await asyncio.wait_for(stop.wait(), timeout=1.0)
        except TimeoutError:
            pass


def run(args: argparse.Namespace) -> int:
    from tandem.deploy.graph import GraphError
    from tandem.model_cache.errors import ModelLoadError

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        graph = build_graph(args)
        _pull_models(graph)
    except (GraphError, ModelLoadError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    private_dir = None
    discovery = args.discovery or graph.discovery
    if discovery is None:
        private_dir = tempfile.mkdtemp(prefix="tandem-serve-")
        discovery = f"file:{private_dir}"
    try:
        return run_event_loop(_serve(args, graph, discovery))
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if private_dir is not None:
            shutil.rmtree(private_dir, ignore_errors=True)
