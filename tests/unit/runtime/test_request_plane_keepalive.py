"""Request-plane keepalive and staged shutdown over real sockets: a frozen worker, a link that
stops forwarding (both ends notice), healthy silence that must survive, control endpoints served
while draining, and streams ended with ``unavailable`` when a drain runs out."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from tests.support import run

from tandem.runtime.request_plane import (
    RequestContext,
    RequestPlaneClient,
    RequestPlaneConfig,
    RequestPlaneServer,
    WorkerUnavailableError,
)
from tandem.runtime.request_plane.frames import Data, FrameDecoder, FrameEncoder

FAST = RequestPlaneConfig(keepalive_interval=0.1, keepalive_timeout=0.5, read_timeout=None)
"""Keepalive in tenths of a second; no read timeout, so only the keepalive can notice silence."""


class FreezableProxy:
    """A TCP proxy to ``upstream``; `freeze()` makes it stop forwarding in both directions while
    keeping both sockets open, like a link whose cable was cut (no FIN, no RST)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.frozen = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._on_connection, "127.0.0.1", 0)
        return f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    def freeze(self) -> None:
        self.frozen.set()

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, port = self.upstream.rsplit(":", 1)
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        self._writers += [writer, up_writer]
        pipes = [asyncio.create_task(self._pipe(reader, up_writer)), asyncio.create_task(self._pipe(up_reader, writer))]
        self._tasks.update(pipes)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*pipes, return_exceptions=True)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while not self.frozen.is_set():
            data = await reader.read(65536)
            if not data or self.frozen.is_set():
                break
            writer.write(data)
            await writer.drain()
        await asyncio.Event().wait()  # hold the sockets open, silently

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in self._writers:
            writer.transport.abort()
        if self._server is not None:
            self._server.close()


def slow_counter(log: list[str]):
    async def handler(payload: dict[str, Any], ctx: RequestContext) -> AsyncIterator[int]:
        finished = False
        try:
            for index in range(payload["n"]):
                await asyncio.sleep(payload["delay"])
                yield index
            finished = True
        finally:  # stopped early: cancelled while sleeping, or closed while suspended at a yield
            log.append("finished" if finished else "cancelled")

    return handler


async def started(config: RequestPlaneConfig, log: list[str]) -> RequestPlaneServer:
    server = RequestPlaneServer(config=config)
    server.register("count", slow_counter(log))
    await server.start()
    return server


def test_a_frozen_worker_fails_its_streams_after_the_keepalive_timeout() -> None:
    """The worker took the request, sent one item, then its read loop froze: it answers nothing,
    yet the socket stays open (no FIN, no RST)."""
    encoder = FrameEncoder()

    async def frozen_after_one_item(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        frames: list[Any] = []
        decoder = FrameDecoder()
        while not frames:
            frames = decoder.feed(await reader.read(65536))
        writer.write(encoder.encode(Data(frames[0].stream_id, "first")))
        await asyncio.Event().wait()  # never reads again, never answers a Ping

    async def body() -> None:
        raw = await asyncio.start_server(frozen_after_one_item, "127.0.0.1", 0)
        address = f"127.0.0.1:{raw.sockets[0].getsockname()[1]}"
        client = RequestPlaneClient(FAST)
        try:
            stream = client.stream(address, "generate", {})
            assert await anext(stream) == "first"
            start = time.monotonic()
            with pytest.raises(WorkerUnavailableError, match="no keepalive answer for 0.5 s"):
                await anext(stream)
            assert 0.4 < time.monotonic() - start < 1.5
            assert client.num_connections == 0
        finally:
            await client.close()
            raw.close()

    run(body)


def test_a_cut_link_is_noticed_by_both_ends() -> None:
    """A proxy stops forwarding mid-stream: the client's stream fails with WorkerUnavailableError,
    and the worker cancels the handler (so a real worker frees the request's KV blocks)."""

    async def body() -> None:
        log: list[str] = []
        server = await started(FAST, log)
        proxy = FreezableProxy(server.address)
        address = await proxy.start()
        client = RequestPlaneClient(FAST)
        try:
            stream = client.stream(address, "count", {"n": 1000, "delay": 0.02})
            assert await anext(stream) == 0
            proxy.freeze()
            start = time.monotonic()
            with pytest.raises(WorkerUnavailableError, match="no keepalive answer"):
                async for _ in stream:
                    pass
            assert time.monotonic() - start < 1.5
            while "cancelled" not in log:  # the worker side gives up on the silent client too
                assert time.monotonic() - start < 2.0, log
                await asyncio.sleep(0.02)
            assert server.num_inflight == 0
        finally:
            await client.close()
            await proxy.close()
            await server.stop(0)

    run(body)


def test_a_live_but_quiet_stream_outlasts_the_keepalive_timeout() -> None:
    """Three times the timeout between two items: the Pongs keep the stream (and the worker's
    side of it) alive."""

    async def body() -> None:
        log: list[str] = []
        server = await started(FAST, log)
        client = RequestPlaneClient(FAST)
        try:
            items = [x async for x in client.stream(server.address, "count", {"n": 2, "delay": 1.5})]
            assert items == [0, 1] and log == ["finished"]
        finally:
            await client.close()
            await server.stop(0)

    run(body)


def test_an_idle_connection_is_not_judged() -> None:
    """No streams, no pings: a connection left idle past the timeout is still used afterwards."""

    async def body() -> None:
        server = await started(FAST, [])
        client = RequestPlaneClient(FAST)
        try:
            assert [x async for x in client.stream(server.address, "count", {"n": 1, "delay": 0})] == [0]
            await asyncio.sleep(1.0)
            assert client.num_connections == 1
            assert [x async for x in client.stream(server.address, "count", {"n": 1, "delay": 0})] == [0]
            assert client.num_connections == 1 and server.num_connections == 1  # the same connection
        finally:
            await client.close()
            await server.stop(0)

    run(body)


@pytest.mark.parametrize("interval, timeout", [(0.0, 10.0), (10.0, 10.0), (11.0, 10.0)])
def test_keepalive_interval_must_be_positive_and_below_the_timeout(interval: float, timeout: float) -> None:
    with pytest.raises(ValueError, match="keepalive_interval"):
        RequestPlaneConfig(keepalive_interval=interval, keepalive_timeout=timeout)
    RequestPlaneConfig(keepalive_interval=None)  # off


def test_draining_serves_control_endpoints_and_ends_leftovers_with_unavailable() -> None:
    async def body() -> None:
        log: list[str] = []
        server = await started(FAST, log)

        async def health(payload: Any, ctx: RequestContext) -> str:
            return "draining" if server.draining else "ok"

        server.register("health", health, while_draining=True)
        client = RequestPlaneClient(FAST)
        try:
            assert await client.call(server.address, "health", None) == "ok"
            long = client.stream(server.address, "count", {"n": 1000, "delay": 0.02})
            short = client.stream(server.address, "count", {"n": 5, "delay": 0.02})
            assert await anext(long) == 0 and await anext(short) == 0
            server.start_draining()
            with pytest.raises(WorkerUnavailableError, match="shutting down"):
                await client.call(server.address, "count", {"n": 1, "delay": 0})
            other = RequestPlaneClient(FAST)  # new connections are still accepted, for health probes
            try:
                assert await other.call(server.address, "health", None) == "draining"
            finally:
                await other.close()
            assert [x async for x in short] == [1, 2, 3, 4]
            assert not await server.wait_drained(0.2)  # the long one is still running
            await server.end_streams("unavailable", "worker drained; migrate")
            with pytest.raises(WorkerUnavailableError, match="worker drained; migrate"):
                async for _ in long:
                    pass
            assert log == ["finished", "cancelled"]
            assert await server.wait_drained(0)
        finally:
            await client.close()
            await server.close()

    run(body)
