"""Real etcd and NATS servers for tests: started on free loopback ports, stopped afterwards.

``EtcdServer`` and ``NatsServer`` run the Debian binaries (``etcd-server``, ``nats-server``,
installed by scripts/setup.sh). Both can be killed and restarted on the same port and data
directory, which is how tests take the infrastructure away and bring it back. The fixtures
``etcd_server`` and ``nats_server`` (function scope) are registered in tests/conftest.py.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.support import free_port

ETCD_BIN = shutil.which("etcd") or "/usr/bin/etcd"
NATS_BIN = shutil.which("nats-server") or "/usr/sbin/nats-server"


def wait_for_port(host: str, port: int, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout_s}s")


class _Server:
    """A child server process that can be stopped, killed and started again on the same ports."""

    name = "server"

    argv_prefix: tuple[str, ...] = ()
    """Prepended to the server's argv (the multi-host test bed runs it through ``ip netns exec``)."""

    def __init__(self, data_dir: Path, host: str = "127.0.0.1") -> None:
        self.data_dir, self.host = Path(data_dir), host
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None
        self.log_path = self.data_dir / f"{self.name}.log"

    def _argv(self) -> list[str]:
        raise NotImplementedError

    @property
    def port(self) -> int:
        raise NotImplementedError

    def start(self, timeout_s: float = 15.0) -> None:
        if self.running:
            return
        with open(self.log_path, "ab") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                [*self.argv_prefix, *self._argv()], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self._wait_listening(timeout_s)

    def _wait_listening(self, timeout_s: float) -> None:
        """Return once the server accepts connections (a subclass probes from elsewhere)."""
        assert self.proc is not None
        wait_for_port(self.host, self.port, timeout_s, self.proc)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: the server vanishes as if its machine died."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 5 s."""
        self._signal(signal.SIGTERM)

    def pause(self) -> None:
        """SIGSTOP: the server keeps its sockets but answers nothing (a hung or overloaded server)."""
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGCONT)

    def _signal(self, sig: int) -> None:
        if not self.running:
            return
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


class EtcdServer(_Server):
    """One etcd member on free loopback ports; ``endpoint`` is its ``host:port`` client address."""

    name = "etcd"

    def __init__(
        self,
        data_dir: Path,
        host: str = "127.0.0.1",
        client_port: int | None = None,
        peer_port: int | None = None,
        member: str = "tandem-test",
    ) -> None:
        super().__init__(data_dir, host)
        self.client_port = client_port or free_port(host)
        self.peer_port = peer_port or free_port(host)
        self.member = member
        self.initial_cluster = f"{member}={self.peer_url}"
        """``--initial-cluster``: this member alone, unless an EtcdCluster sets it."""
        self.extra_args: list[str] = []

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    @property
    def port(self) -> int:
        return self.client_port

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.client_port}"

    def _argv(self) -> list[str]:
        client = f"http://{self.host}:{self.client_port}"
        return [
            ETCD_BIN,
            "--name",
            self.member,
            "--data-dir",
            str(self.data_dir / "data"),
            "--listen-client-urls",
            client,
            "--advertise-client-urls",
            client,
            "--listen-peer-urls",
            self.peer_url,
            "--initial-advertise-peer-urls",
            self.peer_url,
            "--initial-cluster",
            self.initial_cluster,
            "--log-level",
            "warn",
            *self.extra_args,
        ]


class EtcdCluster:
    """``size`` etcd members on loopback forming one cluster, with fast elections (100 ms
    heartbeats, 500 ms election timeout) so that losing a leader shows within seconds."""

    def __init__(self, data_dir: Path, size: int = 3) -> None:
        self.members = [EtcdServer(Path(data_dir) / f"m{i}", member=f"m{i}") for i in range(size)]
        initial = ",".join(f"{m.member}={m.peer_url}" for m in self.members)
        for member in self.members:
            member.initial_cluster = initial
            member.extra_args = ["--heartbeat-interval", "100", "--election-timeout", "500"]

    def start(self, timeout_s: float = 30.0) -> None:
        """Start every member at once (each waits for a quorum before it serves)."""
        threads = [threading.Thread(target=m.start, args=(timeout_s,)) for m in self.members]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for member in self.members:
            if not member.running:
                raise RuntimeError(f"etcd member {member.member} did not start:\n{member.log_tail()}")

    def kill(self) -> None:
        for member in self.members:
            member.kill()


class NatsServer(_Server):
    """One nats-server with JetStream on a free loopback port; ``url`` is ``nats://host:port``."""

    name = "nats"

    def __init__(self, data_dir: Path, host: str = "127.0.0.1", port: int | None = None) -> None:
        super().__init__(data_dir, host)
        self._port = port or free_port(host)

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self._port}"

    def _argv(self) -> list[str]:
        return [NATS_BIN, "-a", self.host, "-p", str(self._port), "-js", "-sd", str(self.data_dir / "js")]


@contextlib.contextmanager
def running(server: _Server, binary: str, package: str) -> Iterator[_Server]:
    """``server`` started (a clear failure when its Debian package is missing), killed afterwards."""
    if not os.path.exists(binary):
        pytest.fail(f"{binary} not found: run scripts/setup.sh (Debian package {package})")
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def etcd_server(tmp_path: Path):
    with running(EtcdServer(tmp_path / "etcd"), ETCD_BIN, "etcd-server") as server:
        yield server


@pytest.fixture
def nats_server(tmp_path: Path):
    with running(NatsServer(tmp_path / "nats"), NATS_BIN, "nats-server") as server:
        yield server
