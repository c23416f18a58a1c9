"""The disaggregated graph with a KV router, one process per test-bed host.

``start_graph`` starts a prefill worker, two decode workers and a frontend (``--router kv``) on
the hosts of :mod:`tests.netns_fixtures`, each bound to its host's address (``--host``), all
through ``ip netns exec``. Discovery and event plane are etcd and NATS on the ``infra`` host when
this tree has them, else file discovery (the namespaces share the filesystem) and ZMQ
(:func:`planes`). The test process talks to the frontend from a thread in the frontend's
namespace (``Graph.call``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx2 as httpx
from tests.netns_fixtures import DECODE_HOSTS, FRONTEND, PREFILL, Cluster

MODEL = "smollm2-135m-instruct"
FRONTEND_PORT = 8000
WORKER_TTL_S = 3.0
"""Discovery lease TTL of the workers: a cut-off worker vanishes this long after its last refresh."""
_WORKER_READY = re.compile(r"^worker (\S+) serving .* on (\S+)$")
_FRONTEND_READY = re.compile(r"^frontend listening on (http://\S+)/v1")

T = TypeVar("T")


def planes() -> tuple[str, str]:
    """(discovery, event plane) for the graph: etcd and NATS once this tree has them.

    ``TANDEM_MULTIHOST_PLANES=file+zmq`` forces the embedded pair."""
    forced = os.environ.get("TANDEM_MULTIHOST_PLANES")
    if forced:
        discovery, _, events = forced.partition("+")
        return discovery, events
    etcd = importlib.util.find_spec("tandem.runtime.discovery.etcd") is not None
    nats = importlib.util.find_spec("tandem.runtime.event_plane.nats_publisher") is not None
    return ("etcd" if etcd else "file"), ("nats" if nats else "zmq")


class HostProcess:
    """A ``python -m tandem ...`` process on one bed host, its output read line by line."""

    def __init__(self, cluster: Cluster, host: str, args: list[str]) -> None:
        self.host = host
        self.proc = cluster.bed.run(
            host,
            [sys.executable, "-m", "tandem", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True, name=f"output {host}")
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: re.Pattern[str], timeout_s: float) -> re.Match[str]:
        """The first output line matching ``pattern``; AssertionError (with the output) on exit or timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if match := pattern.match(line):
                    return match
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(
            f"{self.host}: no line matching {pattern.pattern!r} (exit code {self.proc.poll()}):\n{self.tail()}"
        )

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.lines[-n:])

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, SIGKILL after ``timeout_s``."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._reader.join(5)


@dataclass
class Graph:
    """The running graph: its processes by host, the frontend's URL on the bed."""

    cluster: Cluster
    discovery: str
    event_plane: str
    processes: dict[str, HostProcess] = field(default_factory=dict)
    worker_ids: dict[str, str] = field(default_factory=dict)
    """host → worker id."""
    url: str = ""

    def call(self, fn: Callable[..., T], *args: object, timeout_s: float | None = 300.0, **kwargs: object) -> T:
        """``fn(*args, **kwargs)`` from the frontend host's namespace."""
        return self.cluster.bed.call(FRONTEND, fn, *args, timeout_s=timeout_s, **kwargs)

    def health(self) -> dict[str, Any]:
        """The frontend's /health (fetched from the frontend host)."""
        return self.call(_get_json, self.url + "/health", timeout_s=30)

    def live_workers(self) -> dict[str, dict[str, Any]]:
        """worker id → its /health entry."""
        return {entry["worker_id"]: entry for entry in self.health()["models"].get(MODEL, [])}

    def wait_for_workers(self, count: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.live_workers()) < count:
            assert time.monotonic() < deadline, f"{count} workers not in /health after {timeout_s}s: {self.health()}"
            time.sleep(0.25)

    def stop(self) -> None:
        """SIGTERM to the frontend first (no new requests), then to the workers; wait for all."""
        ordered = sorted(self.processes.values(), key=lambda process: process.host != FRONTEND)
        for process in ordered:
            process.terminate()
        for process in ordered:
            with contextlib.suppress(Exception):
                process.stop()

    def report(self) -> str:
        return "\n".join(f"--- {host} ---\n{process.tail()}" for host, process in self.processes.items())


def _get_json(url: str) -> Any:
    return httpx.get(url, timeout=10).json()


def _plane_args(cluster: Cluster, discovery: str, event_plane: str, discovery_dir: Path) -> list[str]:
    args = ["--event-plane", event_plane, "--namespace", f"tb{cluster.bed.run_id}"]
    if event_plane == "nats":
        args += ["--nats-url", cluster.nats_url]
    if discovery == "etcd":
        return [*args, "--discovery", "etcd", "--etcd-endpoints", cluster.etcd_endpoint]
    return [*args, "--discovery", f"file:{discovery_dir}"]


def start_graph(cluster: Cluster, tmp_dir: Path, timeout_s: float = 300.0) -> Graph:
    """Start the workers and the frontend; return once /health lists all three workers."""
    discovery, event_plane = planes()
    graph = Graph(cluster, discovery, event_plane)
    plane_args = _plane_args(cluster, discovery, event_plane, tmp_dir / "discovery")
    bed = cluster.bed
    worker_common = [
        "worker",
        "--model",
        MODEL,
        "--dtype",
        "float32",
        "--threads",
        "1",
        "--kv-cache-gib",
        "0.25",
        "--ttl",
        str(WORKER_TTL_S),
        "--drain-timeout",
        "2",
        *plane_args,
    ]
    try:
        for host, role in ((PREFILL, "prefill"), *((h, "decode") for h in DECODE_HOSTS)):
            graph.processes[host] = HostProcess(
                cluster, host, [*worker_common, "--role", role, "--host", bed.address(host)]
            )
        graph.processes[FRONTEND] = HostProcess(
            cluster,
            FRONTEND,
            ["frontend", "--host", bed.address(FRONTEND), "--port", str(FRONTEND_PORT), "--router", "kv", *plane_args],
        )
        deadline = time.monotonic() + timeout_s
        for host in (PREFILL, *DECODE_HOSTS):
            ready = graph.processes[host].wait_for(_WORKER_READY, deadline - time.monotonic())
            graph.worker_ids[host] = ready.group(1)
        graph.url = graph.processes[FRONTEND].wait_for(_FRONTEND_READY, deadline - time.monotonic()).group(1)
        graph.wait_for_workers(3, max(1.0, deadline - time.monotonic()))
    except BaseException:
        graph.stop()
        raise
    return graph
