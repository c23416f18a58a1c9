"""Request-plane configuration and error types (shared by the wire format, server and client)."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_FRAME_SIZE = 64 * 2**20


@dataclass(frozen=True)
class RequestPlaneConfig:
    """Timeouts and limits of the request plane. The same object configures servers and clients."""

    connect_timeout: float = 5.0
    """Seconds allowed to open a TCP connection to a worker before `WorkerUnavailableError`."""

    read_timeout: float | None = 120.0
    """Longest silence (seconds) allowed between two frames of one stream before the client gives
    up with `WorkerUnavailableError` (and cancels the stream). Covers queueing and prefill before
    the first item, so keep it generous. None waits forever."""

    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    """Largest frame body in bytes. A peer announcing a bigger frame is a protocol error: its
    connection is closed. Sending a bigger frame fails locally for that stream only."""

    drain_timeout: float = 30.0
    """Default seconds `RequestPlaneServer.stop()` lets in-flight streams finish before ending
    them with code ``unavailable``."""

    cancel_timeout: float = 5.0
    """Seconds `stop()` waits for cancelled handlers' cleanup (their ``finally`` blocks)."""

    read_chunk_size: int = 256 * 1024
    """Bytes asked of the socket per read; every complete frame in a read is decoded at once."""

    keepalive_interval: float | None = 2.0
    """Seconds between two Pings on a connection that has open streams (idle connections are not
    pinged). Both ends do it: the client to notice a worker that froze or whose link died without
    a reset (host hung, cable cut, ``ip link set down``), the worker to notice a client that
    vanished the same way, so it aborts that client's requests and frees their KV blocks.
    None turns keepalive off."""

    keepalive_timeout: float = 10.0
    """Seconds a connection with open streams may stay silent (no Pong, no frame at all) before it
    is declared lost: every stream on it fails with `WorkerUnavailableError` ("no keepalive answer
    for 10 s") on the client, or is cancelled on the worker. Detection takes between this and this
    plus ``keepalive_interval``. Must exceed ``keepalive_interval``."""

    def __post_init__(self) -> None:
        if self.max_frame_size <= 0:
            raise ValueError(f"max_frame_size must be > 0, got {self.max_frame_size}")
        if self.connect_timeout <= 0:
            raise ValueError(f"connect_timeout must be > 0, got {self.connect_timeout}")
        if self.read_timeout is not None and self.read_timeout <= 0:
            raise ValueError(f"read_timeout must be > 0 or None, got {self.read_timeout}")
        if self.read_chunk_size <= 0:
            raise ValueError(f"read_chunk_size must be > 0, got {self.read_chunk_size}")
        if self.keepalive_interval is not None and not 0 < self.keepalive_interval < self.keepalive_timeout:
            raise ValueError(
                f"keepalive_interval must be > 0 and < keepalive_timeout "
                f"({self.keepalive_timeout}), got {self.keepalive_interval}"
            )


class RequestPlaneError(Exception):
    """Base class of every request-plane error."""


class WorkerUnavailableError(RequestPlaneError):
    """The worker cannot be reached: connection refused, connect or read timeout, connection lost
    mid-stream, or the worker is shutting down. The request may be retried on another worker."""

    def __init__(self, address: str, reason: str) -> None:
        super().__init__(f"worker {address} unavailable: {reason}")
        self.address = address
        self.reason = reason


class RemoteError(RequestPlaneError):
    """The remote handler failed for this stream (the connection and other streams are fine)."""

    def __init__(self, code: str, message: str, exc_type: str = "") -> None:
        detail = f"{exc_type}: {message}" if exc_type else message
        super().__init__(f"[{code}] {detail}")
        self.code = code
        self.message = message
        self.exc_type = exc_type


class EndpointError(RequestPlaneError):
    """Raised by a handler to fail its stream with a chosen error code.

    Codes in use: ``bad_request`` (the payload is invalid), ``not_found`` (unknown endpoint or
    resource), ``unavailable`` (the worker is shutting down; clients see
    `WorkerUnavailableError`), ``internal`` (anything unexpected).
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message


def parse_address(address: str) -> tuple[str, int]:
    """Split ``"host:port"`` (or ``"[v6addr]:port"``) into host and port."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"bad request-plane address {address!r}; expected 'host:port'")
    return host.strip("[]"), int(port)


def format_address(host: str, port: int) -> str:
    """Inverse of `parse_address` (brackets IPv6 hosts)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
