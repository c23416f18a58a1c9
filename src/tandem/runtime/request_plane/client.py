"""Request-plane client: one pooled TCP connection per worker address, many streams on each.

The client numbers its streams per connection; a reader task routes every incoming frame to its
stream's inbox (an unbounded deque: the reader never blocks, so one slow consumer cannot stall the
other streams of its connection). Leaving a stream early sends `Cancel`. While streams are open,
a `Keepalive` pings the worker; if it stays silent for ``keepalive_timeout`` (frozen host, dead
link) the connection is declared lost and its streams fail with `WorkerUnavailableError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import time
from collections import deque
from collections.abc import AsyncGenerator
from typing import Any, Final

from tandem.runtime.background import spawn
from tandem.runtime.request_plane.config import (
    RemoteError,
    RequestPlaneConfig,
    RequestPlaneError,
    WorkerUnavailableError,
    parse_address,
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


class _UseConfig:
    """Sentinel type: take the timeout from the client's config."""

    def __repr__(self) -> str:
        return "FROM_CONFIG"


FROM_CONFIG: Final = _UseConfig()
Timeout = float | None | _UseConfig


class _Lost:
    """Inbox marker: the connection is gone."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


_StreamFrame = Data | End | Error
"""The frames the worker sends on a stream (the others are per connection)."""


class _Inbox:
    """Frames received for one stream, with one waiting reader."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: deque[_StreamFrame | _Lost] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def put(self, item: _StreamFrame | _Lost) -> None:
        self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def get(self, timeout: float | None) -> _StreamFrame | _Lost:
        """Next item; raises TimeoutError after ``timeout`` seconds of nothing."""
        if not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(timeout):
                    await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()

    def pop_data_nowait(self) -> list[Any]:
        """Payloads of the Data frames at the head of the inbox, without waiting."""
        payloads = []
        while self._items:
            head = self._items[0]
            if not isinstance(head, Data):
                break
            self._items.popleft()
            payloads.append(head.payload)
        return payloads


class _ClientConnection:
    """One TCP connection to a worker and the streams multiplexed on it."""

    def __init__(
        self,
        address: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        config: RequestPlaneConfig,
    ) -> None:
        self.address = address
        self.config = config
        self._reader = reader
        self._writer = writer
        self._encoder = FrameEncoder(config.max_frame_size)
        self._decoder = FrameDecoder(config.max_frame_size)
        self._ids = itertools.count(1)
        self._inboxes: dict[int, _Inbox] = {}
        self._pings: dict[int, asyncio.Future[None]] = {}
        self.closed = False
        self._read_task = asyncio.create_task(self._read_loop(), name=f"request-plane {address}")
        self._keepalive: Keepalive | None = None
        if config.keepalive_interval is not None:
            self._keepalive = Keepalive(
                config.keepalive_interval,
                config.keepalive_timeout,
                has_streams=lambda: bool(self._inboxes),
                send_ping=lambda: self.write_nowait(Ping(next(self._ids))),
                on_lost=self._lost,
                name=address,
            )

    def open_stream(self) -> tuple[int, _Inbox]:
        """Allocate a stream id and its inbox."""
        stream_id = next(self._ids)
        if not self._inboxes and self._keepalive is not None:
            self._keepalive.heard()  # silence counts from the first stream
        inbox = self._inboxes[stream_id] = _Inbox()
        return stream_id, inbox

    def close_stream(self, stream_id: int, cancel: bool) -> None:
        """Forget a stream; tell the server to cancel it if it has not finished."""
        self._inboxes.pop(stream_id, None)
        if cancel:
            self.write_nowait(Cancel(stream_id))

    async def send(self, frame: Frame) -> None:
        """Write a frame, waiting while the socket buffer is full."""
        if self.closed:
            raise WorkerUnavailableError(self.address, "connection closed")
        self._writer.write(self._encoder.encode(frame))
        try:
            await self._writer.drain()
        except (ConnectionError, OSError) as exc:
            raise WorkerUnavailableError(self.address, f"connection lost: {exc}") from None

    def write_nowait(self, frame: Frame) -> None:
        """Best-effort control frame (Cancel, Pong); dropped if the connection is closing."""
        if not self.closed and not self._writer.is_closing():
            self._writer.write(self._encoder.encode(frame))

    async def ping(self, timeout: float | None) -> None:
        """Round trip a Ping through the server's read loop."""
        nonce = next(self._ids)
        waiter = self._pings[nonce] = asyncio.get_running_loop().create_future()
        try:
            await self.send(Ping(nonce))
            async with asyncio.timeout(timeout):
                await waiter
        finally:
            self._pings.pop(nonce, None)

    async def _read_loop(self) -> None:
        reason = "connection closed by the worker"
        try:
            while True:
                data = await self._reader.read(self.config.read_chunk_size)
                if not data:
                    break
                if self._keepalive is not None:
                    self._keepalive.heard()
                for frame in self._decoder.feed(data):
                    self._dispatch(frame)
        except FrameError as exc:
            reason = f"protocol error: {exc}"
            logger.error("request plane: closing connection to %s: %s", self.address, exc)
        except (ConnectionError, OSError) as exc:
            reason = f"connection lost: {exc}"
        except asyncio.CancelledError:
            reason = "client closed"
            raise
        finally:
            self._fail_all(reason)

    def _dispatch(self, frame: Frame) -> None:
        if isinstance(frame, (Data, End, Error)):
            inbox = self._inboxes.get(frame.stream_id)
            if inbox is not None:  # else: a stream we cancelled; drop its late frames
                inbox.put(frame)
        elif isinstance(frame, Pong):
            waiter = self._pings.get(frame.nonce)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        elif isinstance(frame, Ping):
            self.write_nowait(Pong(frame.nonce))
        else:
            logger.warning("request plane: unexpected %s frame from %s", type(frame).__name__, self.address)

    def _lost(self, reason: str) -> None:
        """The keepalive gave up on the worker: drop the connection and fail its streams."""
        logger.warning("request plane: connection to %s lost: %s", self.address, reason)
        self._fail_all(reason)

    def _fail_all(self, reason: str) -> None:
        """Mark the connection dead and wake every stream and ping with the reason (once)."""
        if self.closed:
            return
        self.closed = True
        if self._keepalive is not None:
            self._keepalive.stop()
        self._writer.transport.abort()
        for inbox in self._inboxes.values():
            inbox.put(_Lost(reason))
        for waiter in self._pings.values():
            if not waiter.done():
                waiter.set_exception(WorkerUnavailableError(self.address, reason))

    async def close(self) -> None:
        """Stop the reader and drop the socket; open streams fail with WorkerUnavailableError."""
        self._read_task.cancel()
        try:
            await self._read_task
        except asyncio.CancelledError:
            pass


class RequestPlaneClient:
    """Calls request-plane endpoints on workers; one lazily opened connection per address."""

    def __init__(self, config: RequestPlaneConfig | None = None) -> None:
        self.config = config or RequestPlaneConfig()
        self._connections: dict[str, _ClientConnection] = {}
        self._connecting: dict[str, asyncio.Task[_ClientConnection]] = {}
        self._closed = False

    @property
    def num_connections(self) -> int:
        """Open connections (one per worker address in use)."""
        return sum(not conn.closed for conn in self._connections.values())

    async def stream_batches(
        self, address: str, endpoint: str, payload: Any, timeout: Timeout = FROM_CONFIG
    ) -> AsyncGenerator[list[Any], None]:
        """Like `stream`, but yields every item already received as one list: a consumer that
        fell behind catches up in one step (at least one item per list)."""
        async with contextlib.aclosing(self._stream(address, endpoint, payload, timeout, batch=True)) as items:
            async for item in items:
                yield item

    async def stream(
        self, address: str, endpoint: str, payload: Any, timeout: Timeout = FROM_CONFIG
    ) -> AsyncGenerator[Any, None]:
        """Call ``endpoint`` on the worker at ``address`` and yield its response items.

        ``timeout`` is the longest wait for each next frame (default ``config.read_timeout``;
        None waits forever). Raises `WorkerUnavailableError` (unreachable, lost, timed out or
        shutting down) or `RemoteError` (the handler failed). Closing the iterator early (``aclose``,
        ``break``) cancels the handler on the worker.
        """
        async with contextlib.aclosing(self._stream(address, endpoint, payload, timeout, batch=False)) as items:
            async for item in items:
                yield item

    async def _stream(
        self, address: str, endpoint: str, payload: Any, timeout: Timeout, batch: bool
    ) -> AsyncGenerator[Any, None]:
        read_timeout = self.config.read_timeout if isinstance(timeout, _UseConfig) else timeout
        conn = await self._connection(address)
        stream_id, inbox = conn.open_stream()
        finished = True  # until the request is out there is nothing to cancel
        try:
            await conn.send(Request(stream_id, endpoint, payload))
            finished = False
            while True:
                frame = await self._next_frame(conn, inbox, endpoint, read_timeout)
                if isinstance(frame, Data):
                    yield [frame.payload, *inbox.pop_data_nowait()] if batch else frame.payload
                    continue
                finished = True
                if isinstance(frame, End):
                    return
                raise _remote_error(address, frame)
        finally:
            conn.close_stream(stream_id, cancel=not finished)

    async def call(self, address: str, endpoint: str, payload: Any, timeout: Timeout = FROM_CONFIG) -> Any:
        """Call a single-response endpoint: its one item (None if it sent none)."""
        items = self.stream(address, endpoint, payload, timeout)
        results: list[Any] = []
        try:
            async for item in items:
                if results:
                    raise RequestPlaneError(f"endpoint {endpoint!r} streamed several items; use stream()")
                results.append(item)
        finally:
            await items.aclose()
        return results[0] if results else None

    async def ping(self, address: str, timeout: Timeout = FROM_CONFIG) -> float:
        """Round-trip time in seconds to the worker at ``address`` (a liveness probe)."""
        limit = self.config.read_timeout if isinstance(timeout, _UseConfig) else timeout
        conn = await self._connection(address)
        start = time.perf_counter()
        try:
            await conn.ping(limit)
        except TimeoutError:
            raise WorkerUnavailableError(address, f"no pong within {limit}s") from None
        return time.perf_counter() - start

    async def close(self) -> None:
        """Close every connection; the client cannot be used afterwards."""
        self._closed = True
        for task in list(self._connecting.values()):
            task.cancel()
        await asyncio.gather(*(conn.close() for conn in self._connections.values()))
        self._connections.clear()

    async def _next_frame(
        self, conn: _ClientConnection, inbox: _Inbox, endpoint: str, timeout: float | None
    ) -> _StreamFrame:
        try:
            item = await inbox.get(timeout)
        except TimeoutError:
            reason = f"no response on {endpoint!r} for {timeout}s (read timeout)"
            raise WorkerUnavailableError(conn.address, reason) from None
        if isinstance(item, _Lost):
            raise WorkerUnavailableError(conn.address, item.reason)
        return item

    async def _connection(self, address: str) -> _ClientConnection:
        """The open connection to ``address``, connecting (once, shared by callers) if needed."""
        if self._closed:
            raise RequestPlaneError("client is closed")
        conn = self._connections.get(address)
        if conn is not None and not conn.closed:
            return conn
        pending = self._connecting.get(address)
        if pending is None:
            pending = asyncio.create_task(self._open(address))
            self._connecting[address] = pending
            pending.add_done_callback(lambda task: self._connect_done(address, task))
        return await asyncio.shield(pending)

    def _connect_done(self, address: str, task: asyncio.Task[_ClientConnection]) -> None:
        if self._connecting.get(address) is task:
            del self._connecting[address]
        if task.cancelled() or task.exception() is not None:
            return
        if self._closed:  # close() raced with this connect: do not leak the connection
            spawn(task.result().close())
        else:
            self._connections[address] = task.result()

    async def _open(self, address: str) -> _ClientConnection:
        host, port = parse_address(address)
        limit = self.config.connect_timeout
        try:
            async with asyncio.timeout(limit):
                reader, writer = await asyncio.open_connection(host, port)
        except TimeoutError:
            raise WorkerUnavailableError(address, f"connect timed out after {limit}s") from None
        except OSError as exc:
            raise WorkerUnavailableError(address, f"cannot connect: {exc.strerror or exc}") from None
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        return _ClientConnection(address, reader, writer, self.config)


def _remote_error(address: str, frame: Error) -> RequestPlaneError:
    """The exception for an Error frame; ``unavailable`` means the worker is going away."""
    if frame.code == "unavailable":
        return WorkerUnavailableError(address, frame.message)
    return RemoteError(frame.code, frame.message, frame.exc_type)
