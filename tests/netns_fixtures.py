"""pytest fixtures for the multi-host test bed (tests/testbed/bed.py).

``testbed`` (module scope) builds one host per part of a disaggregated graph, each its own
network namespace on a private bridge, starts etcd and ``nats-server -js`` on the ``infra``
host bound to its address, and tears everything down afterwards, whatever happened. It skips
only where namespaces cannot be built (not root, no ``ip``); CI runs as root, so there it runs.

The test process stays in the root namespace. It reaches the hosts through ``bed.call(host,
fn, ...)``, which runs ``fn`` on a thread of this process that lives in that host's namespace.
Never connect to a bed address from the root namespace: nothing routes there, and some
sandboxes answer every outgoing TCP connection with a proxy, which would look like success.

The root conftest registers this module as a plugin, so tests simply ask for ``testbed``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from tests.infra_servers import ETCD_BIN, NATS_BIN, EtcdServer, NatsServer, wait_for_port
from tests.testbed import runs as netns_runs
from tests.testbed.bed import Testbed, TestbedConfig
from tests.testbed.netns import ip_binary, probe_support

INFRA = "infra"
PREFILL = "prefill"
DECODE_HOSTS = ("decode1", "decode2")
FRONTEND = "frontend"
HOSTS = (INFRA, PREFILL, *DECODE_HOSTS, FRONTEND)
"""One prefill worker host and two decode worker hosts: what a 2-core machine bears with the real model."""
ETCD_CLIENT_PORT, ETCD_PEER_PORT, NATS_PORT = 2379, 2380, 4222
"""Each namespace has its own ports, so the servers' usual ports are always free there."""


class _InNamespace:
    """Mixin for the servers of tests/infra_servers.py: run through ``ip netns exec`` on a bed
    host, and wait for the port from inside that host's namespace."""

    bed: Testbed
    bed_host: str

    def _enter(self, bed: Testbed, host: str) -> None:
        self.bed, self.bed_host = bed, host
        self.argv_prefix = (ip_binary(), "netns", "exec", bed.namespace(host))

    def _wait_listening(self, timeout_s: float) -> None:
        self.bed.call(self.bed_host, wait_for_port, self.host, self.port, timeout_s, self.proc, timeout_s=timeout_s + 5)


class NetnsEtcdServer(_InNamespace, EtcdServer):
    """etcd on ``host``'s address, ports 2379 (clients) and 2380 (peers)."""

    def __init__(self, bed: Testbed, host: str, data_dir: Path) -> None:
        EtcdServer.__init__(self, data_dir, bed.address(host), ETCD_CLIENT_PORT, ETCD_PEER_PORT)
        self._enter(bed, host)


class NetnsNatsServer(_InNamespace, NatsServer):
    """nats-server with JetStream on ``host``'s address, port 4222."""

    def __init__(self, bed: Testbed, host: str, data_dir: Path) -> None:
        NatsServer.__init__(self, data_dir, bed.address(host), NATS_PORT)
        self._enter(bed, host)


@dataclass
class Cluster:
    """The built bed and the infrastructure servers on its ``infra`` host."""

    bed: Testbed
    etcd: NetnsEtcdServer
    nats: NetnsNatsServer

    @property
    def etcd_endpoint(self) -> str:
        return self.etcd.endpoint

    @property
    def nats_url(self) -> str:
        return self.nats.url


def require_testbed_support() -> None:
    """Skip (clearly) where namespaces cannot be built; fail if the servers are not installed."""
    reason = probe_support()
    if reason is not None:
        pytest.skip(f"multi-host test bed needs network namespaces: {reason}")
    for binary, package in ((ETCD_BIN, "etcd-server"), (NATS_BIN, "nats-server")):
        if not os.path.exists(binary):
            pytest.fail(f"{binary} not found: run scripts/setup.sh (Debian package {package})")


@pytest.fixture(scope="module")
def testbed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require_testbed_support()
    netns_runs.cleanup()  # leftovers of runs whose owner was SIGKILLed; live runs are left alone
    data_dir = tmp_path_factory.mktemp("testbed")
    with Testbed(TestbedConfig(hosts=HOSTS)) as bed:
        etcd, nats = NetnsEtcdServer(bed, INFRA, data_dir / "etcd"), NetnsNatsServer(bed, INFRA, data_dir / "nats")
        try:
            etcd.start()
            nats.start()
            yield Cluster(bed, etcd, nats)
        finally:
            nats.kill()
            etcd.kill()
