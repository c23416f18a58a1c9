"""How a worker process ends: on a signal (graceful drain, exit 0) or on engine failure (exit 1).

`serve_until_stopped` waits for whichever comes first:

- the stop event (the CLI sets it on the first SIGTERM/SIGINT): every service drains gracefully
  (`WorkerService.drain`: withdraw, grace, refuse, finish or end streams, stop the engine);
- an engine failure: the failed service has already withdrawn its card and failed its streams
  with ``unavailable``; it gets a short cleanup, the healthy ones in the same process (``--mocker-workers``)
  drain gracefully, and the process exits with `EXIT_ENGINE_FAILED` so a supervisor restarts it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tandem.worker.service import WorkerService

EXIT_ENGINE_FAILED = 1
"""Exit code of a worker process whose engine died."""


@dataclass(frozen=True)
class ShutdownConfig:
    """Timing of a worker's shutdown (``tandem worker`` flags)."""

    grace_s: float = 1.0
    """``--shutdown-grace``: seconds a withdrawn worker keeps accepting requests, so those routed
    with a stale view of discovery still run (covers discovery's propagation delay)."""
    drain_timeout_s: float = 30.0
    """``--drain-timeout``: seconds in-flight requests (and a prefill worker's held KV exports)
    may take after the grace; streams still running then are ended with ``unavailable`` so the
    frontend migrates them."""
    failed_cleanup_s: float = 2.0
    """Seconds a worker whose engine died spends cleaning up (its streams have failed already)."""

    def __post_init__(self) -> None:
        for name in ("grace_s", "drain_timeout_s", "failed_cleanup_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


async def serve_until_stopped(
    services: Sequence[WorkerService],
    stop: asyncio.Event,
    config: ShutdownConfig,
    announce: Callable[[str], None] = print,
) -> int:
    """Serve until ``stop`` is set or an engine fails, shut every service down, and return the
    process's exit code: 0, or `EXIT_ENGINE_FAILED`. ``announce`` prints the milestones."""
    waiters = [
        asyncio.ensure_future(stop.wait()),
        *(asyncio.ensure_future(service.engine_failed.wait()) for service in services),
    ]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
    failed = [service for service in services if service.engine.failure is not None]
    if failed:
        announce(f"engine failed ({failed[0].engine.failure}); exiting with code {EXIT_ENGINE_FAILED}")
    else:
        announce("draining…")
    await asyncio.gather(*(_shut_down(service, config) for service in services))
    return EXIT_ENGINE_FAILED if any(service.engine.failure is not None for service in services) else 0


async def _shut_down(service: WorkerService, config: ShutdownConfig) -> None:
    if service.engine.failure is not None:
        await service.drain(timeout=config.failed_cleanup_s, grace=0.0)
    else:
        await service.drain(timeout=config.drain_timeout_s, grace=config.grace_s)
