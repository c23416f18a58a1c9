"""Run a graph on this machine: worker processes plus the frontend in this process.

Workers are `python -m tandem worker` child processes that register in a discovery directory
the frontend watches. Children get SIGTERM if this process dies (Linux parent-death signal), so
a killed `tandem serve` leaves no orphan workers. ``stop()`` stops the HTTP server, then sends
SIGTERM to the workers (they withdraw and drain) and SIGKILLs any still alive after the drain
timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time

from tandem.deploy.graph import Graph, WorkerGroup
from tandem.frontend.server import FrontendServer
from tandem.runtime.discovery import make_discovery

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _tokenizer_source(group: WorkerGroup) -> str:
    """What this group's workers will put in their cards as the tokenizer source (see
    `tandem worker`): the model as given for the mocker, the resolved files for the builtin."""
    if group.engine == "mocker":
        return group.model
    from tandem.model_cache import resolve_model

    return resolve_model(group.model, progress=False).source


class StartupError(RuntimeError):
    """A component failed to start (a worker exited, or nothing registered in time)."""


class LocalDeployment:
    def __init__(
        self, graph: Graph, discovery: str, *, drain_timeout: float = 10.0, worker_log_level: str = "WARNING"
    ) -> None:
        self.graph = graph
        self.discovery_spec = discovery
        self.drain_timeout = drain_timeout
        self.worker_log_level = worker_log_level
        self.processes: list[subprocess.Popen[bytes]] = []
        self.server = FrontendServer(graph.frontend, make_discovery(discovery), models=graph.models)

    @property
    def num_workers(self) -> int:
        return sum(group.count * int(group.flags.get("mocker-workers", 1)) for group in self.graph.workers)

    def _spawn(self, group: WorkerGroup, index: int = 0) -> subprocess.Popen[bytes]:
        argv = self._spawn_argv(group, index)
        logger.info("starting worker: %s", " ".join(argv[3:]))
        return subprocess.Popen(argv, preexec_fn=_die_with_parent, stdin=subprocess.DEVNULL)

    def _spawn_argv(self, group: WorkerGroup, index: int = 0) -> list[str]:
        """The command line of worker ``index`` (counted over the whole graph) of ``group``."""
        # The workers drain within this deployment's budget (a graph's own drain-timeout flag wins).
        argv = [
            sys.executable,
            "-m",
            "tandem",
            "worker",
            "--discovery",
            self.discovery_spec,
            "--log-level",
            self.worker_log_level,
            "--drain-timeout",
            str(self.drain_timeout),
            *self.graph.event_plane_argv(),
            *group.worker_argv(),
        ]
        builtin_workers = sum(g.count for g in self.graph.workers if g.engine == "builtin")
        if group.engine == "builtin" and "threads" not in group.flags and builtin_workers > 1:
            # Several engines on one machine: split the cores instead of oversubscribing them.
            argv += ["--threads", str(max(1, (os.cpu_count() or 1) // builtin_workers))]
        if "--kv-disk-cache-dir" in argv:
            # A disk tier belongs to one worker: each gets its own directory under the graph's,
            # the same one after a restart (so it finds its blocks again).
            at = argv.index("--kv-disk-cache-dir") + 1
            argv[at] = os.path.join(argv[at], f"worker-{index}")
        return argv

    async def start(self, timeout: float = 600.0) -> None:
        """Start the workers and the frontend; return once every worker is registered and the
        tokenizers are loaded (raises StartupError if a worker dies or time runs out)."""
        for group in self.graph.workers:
            for _ in range(group.count):
                self.processes.append(self._spawn(group, len(self.processes)))
        await self.server.start()
        frontend = self.server.frontend
        for group in self.graph.workers:  # load tokenizers while the workers boot (seconds saved)
            frontend.tokenizers.preload(_tokenizer_source(group))
        deadline = time.monotonic() + timeout
        while len(frontend.live_workers()) < self.num_workers:
            for proc in self.processes:
                if proc.poll() is not None:
                    raise StartupError(f"a worker exited during startup with code {proc.returncode}")
            if time.monotonic() > deadline:
                raise StartupError(
                    f"only {len(frontend.live_workers())} of {self.num_workers} workers "
                    f"registered within {timeout:.0f}s"
                )
            await asyncio.sleep(0.05)
        await asyncio.gather(*(frontend.tokenizers.get(card.tokenizer) for card in frontend.live_workers()))

    def dead_workers(self) -> list[subprocess.Popen[bytes]]:
        return [proc for proc in self.processes if proc.poll() is not None]

    async def stop(self) -> None:
        await self.server.stop()
        for proc in self.processes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.drain_timeout + 5.0
        while any(proc.poll() is None for proc in self.processes) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.kill()

    def kill(self) -> None:
        """SIGKILL every worker still alive (second Ctrl-C, or after the drain timeout)."""
        for proc in self.processes:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
