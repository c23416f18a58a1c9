"""A multi-host test bed on one machine: network namespaces joined by veth pairs and a bridge.

Layout of one run (``RUNID`` is a short random id, so parallel runs never collide)::

    PREFIX-RUNID-switch      br0 (Linux bridge) ── v-infra, v-worker1, ... (veth ends)
    PREFIX-RUNID-infra       lo, eth0 10.213.0.1/24 ── veth peer of v-infra
    PREFIX-RUNID-worker1     lo, eth0 10.213.0.2/24
    ...

Nothing is added to the root namespace's network: the bridge lives in its own namespace, every
host namespace has only ``lo`` and ``eth0``, and no route leads out. Each run has its own
bridge, so parallel runs may use the same subnet. ``link_down(host)`` sets the host's ``eth0``
down: the cable is cut, its processes keep running and see silence, as after a network fault.

Teardown happens on every path: leaving the ``with`` block, ``close()``, interpreter exit
(atexit) and SIGTERM/SIGHUP (the handler tears down, then lets the signal do what it did
before). It stops the processes started with :meth:`Testbed.run`, kills whatever else still
runs in the namespaces (``ip netns pids``), and deletes the namespaces (veths and bridge go with
them). A run whose owner was SIGKILLed is removed by ``cleanup`` (see
:mod:`tests.testbed.runs`).

CLI (root)::

    python -m tests.testbed.bed up [--hosts infra,worker1,worker2,frontend] [--subnet 10.213.0.0/24]
    python -m tests.testbed.bed exec RUNID HOST -- CMD ...
    python -m tests.testbed.bed list
    python -m tests.testbed.bed down RUNID
    python -m tests.testbed.bed cleanup [--all]
"""

from __future__ import annotations

import argparse
import atexit
import ipaddress
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any, TypeVar

from tests.testbed import runs as netns_runs
from tests.testbed.netns import NETNS_DIR, NamespaceThreads, NetnsUnavailableError, ip, ip_binary, require_support
from tests.testbed.runs import BRIDGE, DEFAULT_PREFIX, SWITCH

DEFAULT_HOSTS = ("infra", "worker1", "worker2", "frontend")
DEFAULT_SUBNET = "10.213.0.0/24"
HOST_INTERFACE = "eth0"
_HOST_NAME = re.compile(r"^[a-z][a-z0-9]{0,12}$")  # the switch-side veth "v-HOST" fits in 15 characters

T = TypeVar("T")


@dataclass(frozen=True)
class TestbedConfig:
    """What to build."""

    __test__ = False  # not a pytest test class

    hosts: tuple[str, ...] = DEFAULT_HOSTS
    """Host names, in address order: 1-13 lowercase letters and digits, starting with a letter."""
    subnet: str = DEFAULT_SUBNET
    """IPv4 subnet of the bed; hosts get its 1st, 2nd, ... address. Private to the run (its own
    bridge in its own namespace), so parallel runs can all use the default."""
    prefix: str = DEFAULT_PREFIX
    """Namespace names start with ``PREFIX-RUNID-``; ``cleanup`` looks for this prefix."""
    stop_grace_s: float = 5.0
    """On teardown, seconds between SIGTERM and SIGKILL of the processes in the namespaces."""

    def __post_init__(self) -> None:
        for host in self.hosts:
            if not _HOST_NAME.match(host) or host == SWITCH:
                raise ValueError(f"bad host name {host!r}: 1-13 of a-z0-9 starting with a letter, not {SWITCH!r}")
        if len(set(self.hosts)) != len(self.hosts):
            raise ValueError(f"host names repeat: {self.hosts}")
        network = ipaddress.IPv4Network(self.subnet)
        if network.num_addresses - 2 < len(self.hosts):
            raise ValueError(f"subnet {self.subnet} has no room for {len(self.hosts)} hosts")
        if not re.match(r"^[a-z][a-z0-9-]{0,30}$", self.prefix):
            raise ValueError(f"bad prefix {self.prefix!r}")


class Testbed:
    """One run of the bed: build with ``with Testbed(config) as bed:`` (or :meth:`start`/:meth:`close`)."""

    __test__ = False  # not a pytest test class

    def __init__(self, config: TestbedConfig | None = None, run_id: str | None = None) -> None:
        self.config = config or TestbedConfig()
        self.run_id = run_id or netns_runs.new_run_id()
        network = ipaddress.IPv4Network(self.config.subnet)
        hosts = network.hosts()
        self._addresses = {host: str(next(hosts)) for host in self.config.hosts}
        self._prefixlen = network.prefixlen
        self._created: list[str] = []  # namespaces, in creation order
        self._processes: list[subprocess.Popen] = []
        self._threads: dict[str, NamespaceThreads] = {}
        self._closed = False
        self._lock = threading.RLock()  # re-entered by a signal handler's close()
        self._closer: threading.Thread | None = None  # the thread running the teardown
        self._torn_down = threading.Event()  # the teardown finished (or failed)

    # --- building ------------------------------------------------------------------------------------

    def start(self) -> Testbed:
        """Build every namespace, link and address. A failure half-way tears down what was built."""
        require_support()
        _register(self)  # first: a build that fails half-way is torn down too
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _build(self) -> None:
        switch = self.namespace(SWITCH)
        self._add_namespace(switch)
        ip("link", "add", BRIDGE, "type", "bridge", namespace=switch)
        netns_runs.write_owner_mark(switch, os.getpid())
        ip("link", "set", BRIDGE, "up", namespace=switch)
        for host in self.config.hosts:
            ns, port = self.namespace(host), f"v-{host}"
            self._add_namespace(ns)
            ip("link", "set", "lo", "up", namespace=ns)
            # Created from inside the switch namespace with the peer placed straight into the
            # host's: neither end ever exists in the root namespace.
            ip("link", "add", port, "type", "veth", "peer", "name", HOST_INTERFACE, "netns", ns, namespace=switch)
            ip("link", "set", port, "master", BRIDGE, "up", namespace=switch)
            ip("addr", "add", f"{self.address(host)}/{self._prefixlen}", "dev", HOST_INTERFACE, namespace=ns)
            ip("link", "set", HOST_INTERFACE, "up", namespace=ns)

    def _add_namespace(self, name: str) -> None:
        ip("netns", "add", name)
        self._created.append(name)

    def __enter__(self) -> Testbed:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def detach(self) -> None:
        """Leave the bed standing after this process exits (``up``): marked detached, not torn
        down at exit; ``down RUNID`` or ``cleanup --all`` removes it."""
        netns_runs.write_owner_mark(self.namespace(SWITCH), None)
        self._close_threads()
        _unregister(self)
        self._closed = True

    # --- using ---------------------------------------------------------------------------------------

    @property
    def hosts(self) -> tuple[str, ...]:
        return self.config.hosts

    def namespace(self, host: str) -> str:
        """The network namespace of ``host`` (``ip netns exec NAME ...``)."""
        if host != SWITCH and host not in self._addresses:
            raise KeyError(f"no host {host!r} in this bed (hosts: {', '.join(self.hosts)})")
        return netns_runs.namespace_name(self.config.prefix, self.run_id, host)

    def address(self, host: str) -> str:
        """``host``'s IPv4 address on the bed's network."""
        self.namespace(host)
        return self._addresses[host]

    def run(self, host: str, argv: list[str], **popen_kwargs: Any) -> subprocess.Popen:
        """Start ``argv`` in ``host``'s namespace (``ip netns exec``); stopped at teardown.

        Defaults: a new session (so a signal to this process's group does not reach it) and
        stdin from /dev/null; ``popen_kwargs`` override them and pass on to ``subprocess.Popen``.
        """
        kwargs = {"start_new_session": True, "stdin": subprocess.DEVNULL, **popen_kwargs}
        with self._lock:
            if self._closed:
                raise RuntimeError(f"test bed {self.run_id} is closed")
            proc = subprocess.Popen([ip_binary(), "netns", "exec", self.namespace(host), *argv], **kwargs)
            self._processes.append(proc)
        return proc

    def call(
        self, host: str, fn: Callable[..., T], *args: object, timeout_s: float | None = 120.0, **kwargs: object
    ) -> T:
        """``fn(*args, **kwargs)`` on a thread of this process that lives in ``host``'s namespace:
        the sockets it opens are on the bed's network (how a test in the root namespace talks to
        the hosts). Coroutines: ``bed.call(host, asyncio.run, main())``."""
        with self._lock:
            if self._closed:
                raise RuntimeError(f"test bed {self.run_id} is closed")
            threads = self._threads.get(host)
            if threads is None:
                threads = self._threads[host] = NamespaceThreads(self.namespace(host))
        return threads.call(fn, *args, timeout_s=timeout_s, **kwargs)

    def link_down(self, host: str) -> None:
        """Cut ``host``'s cable: ``ip link set eth0 down`` in its namespace."""
        ip("link", "set", HOST_INTERFACE, "down", namespace=self.namespace(host))

    def link_up(self, host: str) -> None:
        """Plug it back in."""
        ip("link", "set", HOST_INTERFACE, "up", namespace=self.namespace(host))

    # --- teardown ------------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the processes, kill what else runs in the namespaces, delete the namespaces.
        Idempotent; safe from atexit and signal handlers. Raises only if namespaces survive."""
        with self._lock:
            if self._closed:
                closer = self._closer
                if closer is not None and closer is not threading.current_thread():
                    self._torn_down.wait(_TEARDOWN_WAIT_S)  # another thread is tearing down: wait for it
                return
            self._closed = True
            self._closer = threading.current_thread()
        try:
            self._stop_processes()
            self._close_threads()
            netns_runs.remove_namespaces(list(self._created), self.config.stop_grace_s)
        finally:
            self._torn_down.set()
            _unregister(self)
            _deliver_deferred_signal()
        left = [name for name in self._created if (NETNS_DIR / name).exists()]
        if left:
            raise RuntimeError(f"test bed {self.run_id}: namespaces left after teardown: {left}")

    def _stop_processes(self) -> None:
        """SIGTERM each process started here, SIGKILL those alive after ``stop_grace_s``; reap all."""
        for proc in self._processes:
            if proc.poll() is None:
                proc.terminate()
        for proc in self._processes:
            try:
                proc.wait(self.config.stop_grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    pass  # stuck in the kernel; the namespace sweep tries again

    def _close_threads(self) -> None:
        for threads in self._threads.values():
            threads.close()
        self._threads.clear()


# --- teardown on exit and on signals -----------------------------------------------------------------

_live: set[Testbed] = set()
_previous_handlers: dict[int, Any] = {}
_TEARDOWN_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
_TEARDOWN_WAIT_S = 60.0
"""Longest wait for a teardown that another thread runs."""
_deferred_signals: list[int] = []
"""Signals that arrived while this thread was tearing a bed down: delivered once it is done."""


def _register(bed: Testbed) -> None:
    if not _previous_handlers and not _live:
        atexit.register(_close_all)
        if threading.current_thread() is threading.main_thread():
            for sig in _TEARDOWN_SIGNALS:
                _previous_handlers[sig] = signal.signal(sig, _on_signal)
    _live.add(bed)


def _unregister(bed: Testbed) -> None:
    _live.discard(bed)


def _close_all() -> None:
    for bed in list(_live):
        try:
            bed.close()
        except Exception as exc:  # teardown of the others must go on
            print(f"netns test bed {bed.run_id}: teardown failed: {exc}", file=sys.stderr)


def _tearing_down_here() -> bool:
    """Whether the current thread is in the middle of a bed's teardown."""
    me = threading.current_thread()
    return any(bed._closer is me and not bed._torn_down.is_set() for bed in list(_live))


def _deliver_deferred_signal() -> None:
    """After a teardown: act on a signal that interrupted it, once no teardown runs in this thread."""
    if _deferred_signals and not _tearing_down_here():
        signum = _deferred_signals.pop(0)
        _deferred_signals.clear()
        _on_signal(signum, None)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    """Tear every bed down, then do what the signal did before the bed was built. A signal that
    interrupts a teardown in this thread waits for it: re-raising at once would kill the process
    half-way and leave namespaces behind."""
    if _tearing_down_here():
        _deferred_signals.append(signum)
        return
    _close_all()
    previous = _previous_handlers.get(signum, signal.SIG_DFL)
    if callable(previous):
        previous(signum, frame)
    elif previous != signal.SIG_IGN:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


# --- CLI ---------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tests.testbed.bed", description="Multi-host test bed on network namespaces (needs root)."
    )
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help="namespace name prefix (default: %(default)s)")
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="build a bed that stays until `down RUNID`")
    up.add_argument("--hosts", default=",".join(DEFAULT_HOSTS), help="comma-separated (default: %(default)s)")
    up.add_argument("--subnet", default=DEFAULT_SUBNET, help="IPv4 subnet (default: %(default)s)")
    commands.add_parser("down", help="remove a bed").add_argument("run_id")
    run = commands.add_parser("exec", help="run a command on a host: exec RUNID HOST -- CMD ...")
    run.add_argument("run_id")
    run.add_argument("host")
    run.add_argument("argv", nargs=argparse.REMAINDER)
    commands.add_parser("list", help="runs, their state and their hosts' addresses")
    cleanup = commands.add_parser("cleanup", help="remove the runs whose owner process is gone")
    cleanup.add_argument("--all", action="store_true", help="detached (`up`) runs too")
    return parser


def _find_run(prefix: str, run_id: str) -> netns_runs.RunInfo:
    for run in netns_runs.list_runs(prefix):
        if run.run_id == run_id:
            return run
    raise SystemExit(f"error: no run {run_id!r} (see `list`)")


def _host_address(namespace: str) -> str:
    out = ip("-4", "-o", "addr", "show", "dev", HOST_INTERFACE, namespace=namespace, check=False).split()
    return out[out.index("inet") + 1] if "inet" in out else "-"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        require_support()
    except NetnsUnavailableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.command == "up":
        bed = Testbed(TestbedConfig(hosts=tuple(args.hosts.split(",")), subnet=args.subnet, prefix=args.prefix))
        bed.start()
        bed.detach()
        print(f"run {bed.run_id}")
        for host in bed.hosts:
            print(f"  {host:<14} {bed.namespace(host):<32} {bed.address(host)}")
    elif args.command == "down":
        netns_runs.remove_run(_find_run(args.prefix, args.run_id))
    elif args.command == "exec":
        command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        namespace = _find_run(args.prefix, args.run_id).namespaces.get(args.host)
        if namespace is None or not command:
            raise SystemExit("error: usage: exec RUNID HOST -- CMD ...")
        os.execv(ip_binary(), [ip_binary(), "netns", "exec", namespace, *command])
    elif args.command == "list":
        for run in netns_runs.list_runs(args.prefix):
            print(f"run {run.run_id} {run.state} (owner {run.owner})")
            for host, namespace in sorted(run.namespaces.items()):
                if host != SWITCH:
                    print(f"  {host:<14} {namespace:<32} {_host_address(namespace)}")
    elif args.command == "cleanup":
        removed = netns_runs.cleanup(args.prefix, include_detached=args.all)
        print(f"removed {len(removed)} run(s){': ' + ', '.join(removed) if removed else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
