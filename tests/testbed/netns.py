"""Linux network namespaces through iproute2's ``ip``: the few operations the test bed needs.

Everything here shells out to ``ip`` (Debian package ``iproute2``) except :func:`enter_namespace`,
which moves one thread of this process into a namespace with ``setns(2)`` so that the sockets
that thread opens live on the namespace's network (see :class:`NamespaceThreads`).

Creating, entering and deleting namespaces needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN);
:func:`require_support` and :func:`probe_support` say clearly when that is missing.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

NETNS_DIR = Path("/run/netns")
"""Where ``ip netns add`` pins named namespaces."""
CLONE_NEWNET = 0x40000000
"""``setns(2)`` flag: the file descriptor is a network namespace."""
IP_COMMAND_TIMEOUT_S = 15.0
"""Longest one ``ip`` invocation may take before it counts as failed."""
_IP_FALLBACKS = ("/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip")

T = TypeVar("T")


class NetnsUnavailableError(RuntimeError):
    """This process cannot build network namespaces here (not root, no ``ip``, no kernel support)."""


class IpCommandError(RuntimeError):
    """An ``ip`` command failed; the message carries its argv and stderr."""


def ip_binary() -> str:
    """Path of iproute2's ``ip``; :class:`NetnsUnavailableError` when it is not installed."""
    found = shutil.which("ip") or next((p for p in _IP_FALLBACKS if os.access(p, os.X_OK)), None)
    if found is None:
        raise NetnsUnavailableError("iproute2's `ip` command not found: install it (Debian: apt-get install iproute2)")
    return found


def require_support() -> None:
    """Raise :class:`NetnsUnavailableError` unless this process is root and ``ip`` exists."""
    if os.geteuid() != 0:
        raise NetnsUnavailableError(f"network namespaces need root (running as uid {os.geteuid()})")
    ip_binary()


def probe_support(probe_name: str = "tandem-netns-probe") -> str | None:
    """None if namespaces work here, else why not (adds and deletes one namespace to find out)."""
    try:
        require_support()
        name = f"{probe_name}-{os.getpid()}"
        ip("netns", "add", name)
        ip("netns", "delete", name)
    except (NetnsUnavailableError, IpCommandError) as exc:
        return str(exc)
    return None


def ip(*args: str, namespace: str | None = None, check: bool = True) -> str:
    """Run ``ip [-n NAMESPACE] ARGS...`` and return its stdout; :class:`IpCommandError` on failure."""
    argv = [ip_binary(), *(("-n", namespace) if namespace else ()), *args]
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=IP_COMMAND_TIMEOUT_S, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired as exc:
        raise IpCommandError(f"{' '.join(argv)}: no answer within {IP_COMMAND_TIMEOUT_S:.0f}s") from exc
    if check and done.returncode != 0:
        raise IpCommandError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def list_namespaces() -> list[str]:
    """Names of every named network namespace (``ip netns list``)."""
    # Lines look like "name (id: 3)" or just "name".
    return [line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()]


def namespace_pids(name: str) -> list[int]:
    """Processes whose network namespace is ``name`` (``ip netns pids``); [] if it is gone."""
    return [int(pid) for pid in ip("netns", "pids", name, check=False).split()]


def kill_namespace_processes(name: str, grace_s: float = 3.0, poll_s: float = 0.05) -> list[int]:
    """SIGTERM every process in namespace ``name``, SIGKILL what is left after ``grace_s``.

    Returns the pids that had to be killed with SIGKILL. Bounded: gives up waiting
    ``grace_s + 5`` seconds after it started (a process stuck in the kernel cannot be helped).
    """
    started = time.monotonic()
    _signal_all(namespace_pids(name), signal.SIGTERM)
    while namespace_pids(name) and time.monotonic() - started < grace_s:
        time.sleep(poll_s)
    killed = namespace_pids(name)
    _signal_all(killed, signal.SIGKILL)
    while namespace_pids(name) and time.monotonic() - started < grace_s + 5:
        time.sleep(poll_s)
    return killed


def _signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def delete_namespace(name: str) -> None:
    """``ip netns delete NAME``; a namespace that is already gone is not an error."""
    if (NETNS_DIR / name).exists():
        ip("netns", "delete", name, check=False)


_libc = ctypes.CDLL(None, use_errno=True)


def enter_namespace(name: str) -> None:
    """Move the calling thread, and only it, into network namespace ``name``.

    Sockets the thread opens afterwards live on that namespace's network, and stay there when
    other threads use them. Threads it starts inherit the namespace.
    """
    fd = os.open(NETNS_DIR / name, os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns = getattr(os, "setns", None)  # Python >= 3.12
        if setns is not None:
            setns(fd, CLONE_NEWNET)
        elif _libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns into network namespace {name!r}: {os.strerror(errno)}")
    finally:
        os.close(fd)


class NamespaceThreads:
    """Threads that live in a network namespace and run the callables given to :meth:`call`.

    The way for code in this process (a test) to talk to addresses on a namespace's network:
    ``NamespaceThreads("ns").call(httpx.get, "http://10.213.0.5:8000/health")``. A coroutine
    runs with ``asyncio.run`` inside a thread: ``call(asyncio.run, main())``. Up to
    ``max_threads`` calls run at once (each thread enters the namespace when it starts); a call
    that times out keeps its thread busy until it returns.
    """

    def __init__(self, namespace: str, max_threads: int = 4) -> None:
        self.namespace = namespace
        self._pool = ThreadPoolExecutor(
            max_threads, thread_name_prefix=f"netns-{namespace}", initializer=enter_namespace, initargs=(namespace,)
        )

    def call(self, fn: Callable[..., T], *args: object, timeout_s: float | None = 120.0, **kwargs: object) -> T:
        """``fn(*args, **kwargs)`` in the namespace; its result, or its exception re-raised here."""
        return self._pool.submit(fn, *args, **kwargs).result(timeout=timeout_s)

    def close(self) -> None:
        """Stop the threads once the calls under way (if any) return."""
        self._pool.shutdown(wait=False, cancel_futures=True)
