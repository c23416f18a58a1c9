"""Request-plane server: serves registered endpoints to many multiplexed streams per connection.

Each incoming `Request` runs its endpoint's handler in its own task. A handler is either an async
generator (``async def h(payload, ctx): yield ...``; each item becomes a `Data` frame) or a
coroutine function whose return value becomes the only `Data` frame. `End` or `Error` closes the
stream. A `Cancel` frame, or the connection dropping, cancels the task, so the handler's
``finally`` runs (a worker aborts the engine request there). A client that goes silent while it
has streams open (see `tandem.runtime.request_plane.keepalive`) counts as dropped.

Shutting down is three steps a worker can space out (`stop` does them back to back):
`start_draining` refuses new requests with code ``unavailable`` (control endpoints such as
``health`` keep answering), `wait_drained` lets in-flight streams finish, and `end_streams` ends
the rest with an ``unavailable`` error, so the client can move them elsewhere; `close` then hangs up.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from tandem.runtime.request_plane.config import (
    EndpointError,
    RemoteError,
    RequestPlaneConfig,
    format_address,
)
from tandem.runtime.request_plane.frames import (
    Cancel,
    Data,
    End,
    Error,
    Frame,
    FrameDecoder,
    FrameEncoder,
    FrameError,
    Ping,
    Pong,
    Request,
)
from tandem.runtime.request_plane.keepalive import Keepalive

logger = logging.getLogger(__name__)

SHUTTING_DOWN = "worker is shutting down"
"""Why a stopping server refuses, and ends, streams (code ``unavailable``)."""

FLUSH_BYTES = 64 * 1024
"""Queued outgoing bytes that trigger an immediate write instead of one at the loop's next turn."""


@dataclass(frozen=True)
class RequestContext:
    """What a handler knows about the stream it serves."""

    stream_id: int
    """Client-assigned stream id (unique per connection)."""
    endpoint: str
    """The endpoint name the client called."""
    peer: str
    """The client's ``host:port``."""


Handler = Callable[[Any, RequestContext], AsyncIterator[Any] | Awaitable[Any]]


class RequestPlaneServer:
    """TCP server for request-plane endpoints (see module docstring)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, config: RequestPlaneConfig | None = None) -> None:
        self.host = host
        self.port = port
        self.config = config or RequestPlaneConfig()
        self._handlers: dict[str, Handler] = {}
        self._server: asyncio.Server | None = None
        self._address: str | None = None
        self._connections: set[_ServerConnection] = set()
        self._control: set[str] = set()
        self._refusal: str | None = None  # why new requests are refused; None while serving

    def register(self, endpoint: str, handler: Handler, *, while_draining: bool = False) -> None:
        """Serve ``handler`` under ``endpoint`` (may be called before or after `start`).
        ``while_draining``: a control endpoint (health, stats...), still served after
        `start_draining` and not waited for by `wait_drained`."""
        if endpoint in self._handlers:
            raise ValueError(f"endpoint {endpoint!r} is already registered")
        self._handlers[endpoint] = handler
        if while_draining:
            self._control.add(endpoint)

    @property
    def endpoints(self) -> list[str]:
        """Registered endpoint names."""
        return sorted(self._handlers)

    @property
    def address(self) -> str:
        """``host:port`` clients connect to (the real port when started with port 0)."""
        if self._address is None:
            raise RuntimeError("server is not started")
        return self._address

    @property
    def num_connections(self) -> int:
        """Open client connections."""
        return len(self._connections)

    @property
    def num_inflight(self) -> int:
        """Streams whose handlers are running now."""
        return sum(len(conn.streams) for conn in self._connections)

    @property
    def draining(self) -> bool:
        """True once `start_draining` (or `stop`) was called."""
        return self._refusal is not None

    async def start(self) -> None:
        """Bind and start accepting connections."""
        if self._server is not None:
            raise RuntimeError("server already started")
        self._server = await asyncio.start_server(self._on_connection, self.host, self.port)
        self._address = format_address(self.host, self._server.sockets[0].getsockname()[1])
        logger.info("request plane listening on %s", self.address)

    async def stop(self, drain_timeout: float | None = None) -> None:
        """Refuse new requests, let in-flight streams finish for up to ``drain_timeout`` seconds
        (default: config), end the rest with code ``unavailable``, then close."""
        self.start_draining()
        if not await self.wait_drained(self.config.drain_timeout if drain_timeout is None else drain_timeout):
            await self.end_streams("unavailable", SHUTTING_DOWN)
        await self.close()

    def start_draining(self, reason: str = SHUTTING_DOWN) -> None:
        """From now on new requests fail with code ``unavailable`` and ``reason`` (control
        endpoints excepted). Connections stay open and new ones are still accepted, so clients
        can ask a draining worker for its health."""
        if self._refusal is None:
            self._refusal = reason

    async def wait_drained(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for in-flight streams (control endpoints excepted) to
        finish; True if none is left."""
        deadline = asyncio.get_running_loop().time() + timeout
        while tasks := self._work_streams():
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return False
            await asyncio.wait(tasks, timeout=remaining)
        return True

    async def end_streams(self, code: str, message: str) -> None:
        """End every in-flight stream now with an Error frame (``code``, ``message``) and cancel
        its handler; waits up to ``cancel_timeout`` for the handlers' cleanup."""
        tasks = [task for conn in list(self._connections) for task in conn.end_streams(code, message)]
        if tasks:
            await asyncio.wait(tasks, timeout=self.config.cancel_timeout)

    async def close(self) -> None:
        """Stop listening and close every connection (streams still running are cancelled)."""
        if self._server is not None:
            self._server.close()
        await asyncio.gather(*(conn.close() for conn in list(self._connections)))
        if self._server is not None:
            await self._server.wait_closed()

    def _work_streams(self) -> list[asyncio.Task[None]]:
        return [
            task
            for conn in self._connections
            for stream_id, task in conn.streams.items()
            if conn.endpoint_of.get(stream_id) not in self._control
        ]

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _ServerConnection(self, reader, writer)
        self._connections.add(conn)
        try:
            await conn.serve()
        finally:
            self._connections.discard(conn)


class _ServerConnection:
    """One client connection: reads frames, runs a task per stream, writes responses."""

    def __init__(self, server: RequestPlaneServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.streams: dict[int, asyncio.Task[None]] = {}
        self.endpoint_of: dict[int, str] = {}
        """Endpoint of each stream in ``streams``."""
        self.closed = False
        peer = writer.get_extra_info("peername")
        self.peer = format_address(peer[0], peer[1]) if peer else "?"
        self._encoder = FrameEncoder(server.config.max_frame_size)
        self._decoder = FrameDecoder(server.config.max_frame_size)
        self._outgoing: list[bytearray] = []
        self._outgoing_bytes = 0
        self._flush_scheduled = False
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        config = server.config
        self._keepalive: Keepalive | None = None
        if config.keepalive_interval is not None:
            self._keepalive = Keepalive(
                config.keepalive_interval,
                config.keepalive_timeout,
                has_streams=lambda: bool(self.streams),
                send_ping=lambda: self.write_nowait(Ping(0)),
                on_lost=self._lost,
                name=self.peer,
            )

    async def serve(self) -> None:
        """Read loop. A protocol violation closes this connection (logged), nothing more."""
        try:
            while True:
                data = await self.reader.read(self.server.config.read_chunk_size)
                if not data:
                    break
                if self._keepalive is not None:
                    self._keepalive.heard()
                for frame in self._decoder.feed(data):
                    self._dispatch(frame)
        except FrameError as exc:
            logger.error("request plane: closing connection from %s: %s", self.peer, exc)
        except (ConnectionError, OSError) as exc:
            logger.debug("request plane: connection from %s lost: %s", self.peer, exc)
        finally:
            await self.close()

    def _dispatch(self, frame: Frame) -> None:
        if self.closed:
            return  # frames read after close() began start no new work
        if isinstance(frame, Request):
            self._start_stream(frame)
        elif isinstance(frame, Cancel):
            task = self.streams.get(frame.stream_id)
            if task is not None:
                task.cancel()
        elif isinstance(frame, Ping):
            self.write_nowait(Pong(frame.nonce))
        elif not isinstance(frame, Pong):
            logger.warning("request plane: unexpected %s frame from %s", type(frame).__name__, self.peer)

    def _start_stream(self, request: Request) -> None:
        stream_id = request.stream_id
        refusal = self.server._refusal
        if refusal is not None and request.endpoint not in self.server._control:
            self.write_nowait(Error(stream_id, "unavailable", refusal))
        elif stream_id in self.streams:
            self.write_nowait(Error(stream_id, "bad_request", f"stream {stream_id} is already open"))
        else:
            if not self.streams and self._keepalive is not None:
                self._keepalive.heard()  # silence counts from the first stream
            task = asyncio.create_task(self._run_stream(request))
            self.streams[stream_id] = task
            self.endpoint_of[stream_id] = request.endpoint
            task.add_done_callback(functools.partial(self._forget_stream, stream_id))

    def _forget_stream(self, stream_id: int, task: asyncio.Task[None]) -> None:
        if self.streams.get(stream_id) is task:
            del self.streams[stream_id]
            del self.endpoint_of[stream_id]

    def end_streams(self, code: str, message: str) -> list[asyncio.Task[None]]:
        """Answer every running stream with an Error frame and cancel its handler (which sends
        nothing more); returns the cancelled tasks."""
        tasks = []
        for stream_id, task in list(self.streams.items()):
            if not task.done():
                self.write_nowait(Error(stream_id, code, message))
                task.cancel()
                tasks.append(task)
        return tasks

    def _lost(self, reason: str) -> None:
        """The keepalive gave up on the client: cancel its streams (freeing their resources)."""
        logger.warning(
            "request plane: client %s lost (%s); cancelling its %d streams", self.peer, reason, len(self.streams)
        )
        self.writer.transport.abort()  # the read loop sees the end and closes the rest

    async def _run_stream(self, request: Request) -> None:
        """Run one handler to completion, sending Data..., then End or Error."""
        stream_id = request.stream_id
        try:
            handler = self.server._handlers.get(request.endpoint)
            if handler is None:
                known = ", ".join(self.server.endpoints) or "none"
                raise EndpointError("not_found", f"unknown endpoint {request.endpoint!r} (serving: {known})")
            ctx = RequestContext(stream_id, request.endpoint, self.peer)
            result = handler(request.payload, ctx)
            if inspect.isawaitable(result):
                await self.send(Data(stream_id, await result))
            else:
                await self._send_items(stream_id, result)
            await self.send(End(stream_id))
        except ConnectionError:
            return  # the client is gone: nobody to answer
        except Exception as exc:  # every handler failure becomes an Error frame
            self.write_nowait(_error_frame(stream_id, request.endpoint, exc))

    async def _send_items(self, stream_id: int, items: AsyncIterator[Any]) -> None:
        try:
            async for item in items:
                await self.send(Data(stream_id, item))
        finally:
            aclose = getattr(items, "aclose", None)
            if aclose is not None:
                await aclose()  # run the generator's finally even if we stopped on a send

    async def send(self, frame: Frame) -> None:
        """Queue one frame, then wait while the socket buffer is full (backpressure)."""
        if self.closed:
            raise ConnectionResetError("connection closed")
        self._queue_bytes(self._encoder.encode(frame))
        await self.writer.drain()

    def write_nowait(self, frame: Frame) -> None:
        """Queue a small control frame without waiting for the buffer to drain."""
        if not self.closed and not self.writer.is_closing():
            self._queue_bytes(self._encoder.encode(frame))

    def _queue_bytes(self, data: bytearray) -> None:
        # Write coalescing: frames produced by all streams within one event-loop iteration
        # (e.g. one engine step's tokens for every running request) leave in one write call,
        # i.e. one syscall instead of one per frame. Past FLUSH_BYTES we flush at once, so a
        # handler that never yields cannot pile up unbounded bytes outside the transport.
        self._outgoing.append(data)
        self._outgoing_bytes += len(data)
        if self._outgoing_bytes >= FLUSH_BYTES:
            self._flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._outgoing:
            return
        data = b"".join(self._outgoing)
        self._outgoing.clear()
        self._outgoing_bytes = 0
        if not self.writer.is_closing():
            self.writer.write(data)

    async def close(self) -> None:
        """Cancel this connection's streams and close the socket (bounded wait)."""
        if self.closed:
            return
        self.closed = True
        if self._keepalive is not None:
            self._keepalive.stop()
        for task in list(self.streams.values()):
            task.cancel()
        self._flush()
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), timeout=1.0)
        except (TimeoutError, ConnectionError, OSError):
            self.writer.transport.abort()


def _error_frame(stream_id: int, endpoint: str, exc: Exception) -> Error:
    """Map a handler exception to the stream's Error frame."""
    if isinstance(exc, EndpointError):
        return Error(stream_id, exc.code, exc.message)
    if isinstance(exc, RemoteError):  # a handler that proxies another worker passes its error on
        return Error(stream_id, exc.code, exc.message, exc.exc_type)
    exc_type = type(exc).__name__
    if isinstance(exc, msgspec.ValidationError):
        return Error(stream_id, "bad_request", str(exc), exc_type)
    logger.warning("request plane: handler %r failed", endpoint, exc_info=exc)
    return Error(stream_id, "internal", str(exc), exc_type)
