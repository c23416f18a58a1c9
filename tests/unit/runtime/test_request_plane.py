"""Request plane over real sockets on 127.0.0.1: streams, multiplexing, cancellation, errors,
timeouts, hostile bytes, graceful shutdown, and a fuzz of the frame decoder."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.support import free_port, run, wait_until

from tandem.runtime.request_plane import (
    EndpointError,
    FrameTooLargeError,
    RemoteError,
    RequestContext,
    RequestPlaneClient,
    RequestPlaneConfig,
    RequestPlaneServer,
    WorkerUnavailableError,
)
from tandem.runtime.request_plane.frames import (
    HEADER,
    Data,
    End,
    FrameDecoder,
    FrameEncoder,
    FrameError,
    Request,
)

TEST_DEADLINE_S = 10.0


async def count_up(payload: dict[str, Any], ctx: RequestContext) -> AsyncIterator[dict[str, Any]]:
    """Yield ``n`` items tagged with the caller's tag, letting other streams run in between."""
    for index in range(payload["n"]):
        await asyncio.sleep(payload.get("delay", 0))
        yield {"tag": payload["tag"], "i": index}


async def echo(payload: Any, ctx: RequestContext) -> Any:
    return payload


async def started_server(config: RequestPlaneConfig | None = None, port: int = 0) -> RequestPlaneServer:
    server = RequestPlaneServer("127.0.0.1", port, config)
    server.register("count", count_up)
    server.register("echo", echo)
    await server.start()
    return server


def test_round_trip_stream_call_and_ping() -> None:
    async def body() -> None:
        server = await started_server()
        client = RequestPlaneClient()
        try:
            items = [x async for x in client.stream(server.address, "count", {"n": 3, "tag": "a"})]
            assert items == [{"tag": "a", "i": i} for i in range(3)]
            payload = {"ids": [1, 2, 3], "blob": b"\x00\xff", "nested": {"x": [None, 1.5, True]}}
            assert await client.call(server.address, "echo", payload) == payload
            assert await client.ping(server.address) < 1.0
        finally:
            await client.close()
            await server.stop(0)

    run(body)


def test_many_concurrent_streams_share_one_connection_and_interleave() -> None:
    num_streams, num_items = 100, 20
    arrivals: list[int] = []

    async def consume(client: RequestPlaneClient, address: str, tag: int) -> list[dict[str, Any]]:
        items = []
        async for item in client.stream(address, "count", {"n": num_items, "tag": tag}):
            arrivals.append(tag)
            items.append(item)
        return items

    async def body() -> None:
        server = await started_server()
        client = RequestPlaneClient()
        try:
            results = await asyncio.gather(*(consume(client, server.address, tag) for tag in range(num_streams)))
            for tag, items in enumerate(results):
                assert items == [{"tag": tag, "i": i} for i in range(num_items)]
            assert client.num_connections == 1 and server.num_connections == 1
            # Interleaved: stream 0 did not finish before the last stream started.
            assert arrivals.index(num_streams - 1) < len(arrivals) - 1 - arrivals[::-1].index(0)
        finally:
            await client.close()
            await server.stop(0)

    run(body)


def test_large_items_with_a_slow_consumer_arrive_intact() -> None:
    """Items bigger than the socket buffers: backpressure (drain) and partial frames per read."""
    item_size, num_items = 256 * 1024, 24

    async def big(payload: Any, ctx: RequestContext) -> AsyncIterator[bytes]:
        for index in range(num_items):
            yield bytes([index]) * item_size

    async def body() -> None:
        server = await started_server()
        server.register("big", big)
        client = RequestPlaneClient()
        try:
            small = asyncio.create_task(client.call(server.address, "echo", "small"))
            received = []
            async for item in client.stream(server.address, "big", None):
                received.append(item)
                await asyncio.sleep(0.002)
            assert [len(x) for x in received] == [item_size] * num_items
            assert all(x == bytes([i]) * item_size for i, x in enumerate(received))
            assert await small == "small"
        finally:
            await client.close()
            await server.stop(0)

    run(body)


def _cancellable_server() -> tuple[Callable[..., AsyncIterator[int]], asyncio.Event, list[str]]:
    events: list[str] = []
    finished = asyncio.Event()

    async def forever(payload: Any, ctx: RequestContext) -> AsyncIterator[int]:
        try:
            index = 0
            while True:
                yield index
                index += 1
                await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            events.append("cancelled")
            raise
        finally:
            events.append("finally")
            finished.set()

    return forever, finished, events


@pytest.mark.parametrize("how", ["aclose", "break", "client_close"])
def test_client_side_abandon_cancels_the_server_handler(how: str) -> None:
    async def body() -> None:
        forever, finished, events = _cancellable_server()
        server = RequestPlaneServer()
        server.register("forever", forever)
        server.register("echo", echo)
        await server.start()
        client = RequestPlaneClient()
        try:
            stream = client.stream(server.address, "forever", None)
            if how == "break":
                async for item in stream:
                    if item == 2:
                        break
                del stream  # the loop's async-generator finalizer closes it
            else:
                assert [await anext(stream) for _ in range(3)] == [0, 1, 2]
                await (stream.aclose() if how == "aclose" else client.close())
            await asyncio.wait_for(finished.wait(), 2.0)
            assert "finally" in events
            await wait_until(lambda: server.num_inflight == 0)
            if how != "client_close":  # the connection survives a cancelled stream
                assert await client.call(server.address, "echo", 7) == 7
        finally:
            await client.close()
            await server.stop(0)

    run(body)


def test_handler_exception_fails_only_its_stream() -> None:
    async def flaky(payload: dict[str, Any], ctx: RequestContext) -> AsyncIterator[int]:
        yield 1
        await asyncio.sleep(0.01)
        if payload["kind"] == "value":
            raise ValueError("boom")
        if payload["kind"] == "endpoint":
            raise EndpointError("bad_request", "max_tokens must be > 0")
        msgspec.convert({"x": "not an int"}, dict[str, int])

    async def body() -> None:
        server = await started_server()
        server.register("flaky", flaky)
        client = RequestPlaneClient()
        try:
            good = [client.call(server.address, "echo", i) for i in range(5)]
            bad = [client.call(server.address, "flaky", {"kind": kind}) for kind in ("value", "endpoint", "validation")]
            results = await asyncio.gather(*good, *bad, return_exceptions=True)
            assert results[:5] == list(range(5))
            errors = results[5:]
            assert all(isinstance(e, RemoteError) for e in errors), errors
            assert (errors[0].code, errors[0].exc_type, errors[0].message) == ("internal", "ValueError", "boom")
            assert (errors[1].code, errors[1].message) == ("bad_request", "max_tokens must be > 0")
            assert (errors[2].code, errors[2].exc_type) == ("bad_request", "ValidationError")
            assert await client.call(server.address, "echo", "still fine") == "still fine"
        finally:
            await client.close()
            await server.stop(0)

    run(body)


def test_unknown_endpoint_is_not_found() -> None:
    async def body() -> None:
        server = await started_server()
        client = RequestPlaneClient()
        try:
            with pytest.raises(RemoteError) as info:
                await client.call(server.address, "no_such_endpoint", {})
            assert info.value.code == "not_found"
            assert "no_such_endpoint" in info.value.message
        finally:
            await client.close()
            await server.stop(0)

    run(body)


def test_oversized_payloads_fail_locally_for_that_stream_only() -> None:
    config = RequestPlaneConfig(max_frame_size=1024)

    async def huge(payload: Any, ctx: RequestContext) -> bytes:
        return b"x" * 4096

    async def body() -> None:
        server = await started_server(config)
        server.register("huge", huge)
        client = RequestPlaneClient(config)
        try:
            with pytest.raises(FrameTooLargeError):
                await client.call(server.address, "echo", b"y" * 4096)
            with pytest.raises(FrameError):
                await client.call(server.address, "echo", object())
            with pytest.raises(RemoteError) as info:
                await client.call(server.address, "huge", None)
            assert info.value.code == "internal" and "exceeds" in info.value.message
            assert await client.call(server.address, "echo", "ok") == "ok"
        finally:
            await client.close()
            await server.stop(0)

    run(body)


def test_server_stopped_mid_stream_raises_worker_unavailable_then_reconnects() -> None:
    async def body() -> None:
        server = await started_server()
        address, port = server.address, int(server.address.rsplit(":", 1)[1])
        client = RequestPlaneClient()
        try:
            stream = client.stream(address, "count", {"n": 1000, "tag": 0, "delay": 0.01})
            assert await anext(stream) == {"tag": 0, "i": 0}
            await server.stop(drain_timeout=0)
            start = time.monotonic()
            with pytest.raises(WorkerUnavailableError) as info:
                async for _ in stream:
                    pass
            assert time.monotonic() - start < 1.0
            assert info.value.address == address
            server = await started_server(port=port)  # the worker comes back on the same port
            assert await client.call(address, "echo", 1) == 1
        finally:
            await client.close()
            await server.stop(0)

    run(body)


async def _raw_server(
    on_connection: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> tuple[asyncio.Server, str]:
    server = await asyncio.start_server(on_connection, "127.0.0.1", 0)
    return server, f"127.0.0.1:{server.sockets[0].getsockname()[1]}"


def test_socket_closed_mid_stream_raises_worker_unavailable() -> None:
    encoder = FrameEncoder()

    async def one_item_then_hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = FrameDecoder()
        frames: list[Any] = []
        while not frames:
            frames = decoder.feed(await reader.read(65536))
        writer.write(encoder.encode(Data(frames[0].stream_id, "first")))
        await writer.drain()
        writer.close()

    async def body() -> None:
        raw, address = await _raw_server(one_item_then_hang_up)
        client = RequestPlaneClient()
        try:
            stream = client.stream(address, "generate", {})
            assert await anext(stream) == "first"
            with pytest.raises(WorkerUnavailableError, match="closed by the worker"):
                await anext(stream)
        finally:
            await client.close()
            raw.close()

    run(body)


def test_silent_worker_hits_the_read_timeout() -> None:
    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # swallow everything until the client hangs up
        writer.close()

    async def body() -> None:
        raw, address = await _raw_server(never_answer)
        client = RequestPlaneClient(RequestPlaneConfig(read_timeout=0.2))
        try:
            start = time.monotonic()
            with pytest.raises(WorkerUnavailableError, match="read timeout"):
                await client.call(address, "generate", {})
            assert 0.15 < time.monotonic() - start < 1.5
            with pytest.raises(WorkerUnavailableError):  # per-call override
                await client.call(address, "generate", {}, timeout=0.05)
        finally:
            await client.close()
            raw.close()

    run(body)


def test_connect_to_closed_port_fails_fast() -> None:
    async def body() -> None:
        config = RequestPlaneConfig(connect_timeout=0.5)
        client = RequestPlaneClient(config)
        address = f"127.0.0.1:{free_port()}"
        try:
            start = time.monotonic()
            calls = [client.call(address, "echo", i) for i in range(20)]  # one shared connect
            results = await asyncio.gather(*calls, return_exceptions=True)
            assert all(isinstance(r, WorkerUnavailableError) for r in results), results
            assert "cannot connect" in str(results[0])
            assert time.monotonic() - start < config.connect_timeout + 0.5
        finally:
            await client.close()

    run(body)


@pytest.mark.parametrize(
    "hostile",
    [
        HEADER.pack(2**31) + b"x" * 16,  # announces a 2 GiB frame
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # wrong protocol
        HEADER.pack(5) + b"\xc1\xc1\xc1\xc1\xc1",  # invalid msgpack
        HEADER.pack(3) + msgspec.msgpack.encode(["zz", 1]),  # unknown frame tag
        FrameEncoder().encode(Data(1, "server-bound Data")) + HEADER.pack(1) + b"\x91",
    ],
)
def test_hostile_bytes_close_only_that_connection(hostile: bytes) -> None:
    async def body() -> None:
        server = await started_server(RequestPlaneConfig(max_frame_size=1 << 20))
        client = RequestPlaneClient()
        try:
            assert await client.call(server.address, "echo", "before") == "before"
            host, port = server.address.rsplit(":", 1)
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(hostile)
            await writer.drain()
            assert await asyncio.wait_for(reader.read(), 2.0) == b""  # server hung up on it
            writer.close()
            assert await client.call(server.address, "echo", "after") == "after"
            items = [x async for x in client.stream(server.address, "count", {"n": 3, "tag": 1})]
            assert len(items) == 3
        finally:
            await client.close()
            await server.stop(0)

    run(body)


def test_graceful_stop_drains_in_flight_streams() -> None:
    async def body() -> None:
        server = await started_server()
        client = RequestPlaneClient()
        try:
            payload = {"n": 10, "tag": "slow", "delay": 0.02}
            stream = client.stream(server.address, "count", payload)
            first = await anext(stream)
            stopping = asyncio.create_task(server.stop(drain_timeout=5.0))
            await asyncio.sleep(0.01)
            with pytest.raises(WorkerUnavailableError, match="shutting down"):
                await client.call(server.address, "echo", 1)  # no new work while draining
            rest = [x async for x in stream]
            assert [first, *rest] == [{"tag": "slow", "i": i} for i in range(10)]
            await asyncio.wait_for(stopping, 2.0)
        finally:
            await client.close()

    run(body)


def test_stop_cancels_streams_that_outlive_the_drain_timeout() -> None:
    async def body() -> None:
        forever, finished, events = _cancellable_server()
        server = RequestPlaneServer()
        server.register("forever", forever)
        await server.start()
        client = RequestPlaneClient()
        try:
            stream = client.stream(server.address, "forever", None)
            await anext(stream)
            start = time.monotonic()
            await server.stop(drain_timeout=0.1)
            assert time.monotonic() - start < 1.5
            assert finished.is_set() and "cancelled" in events
            with pytest.raises(WorkerUnavailableError):
                async for _ in stream:
                    pass
        finally:
            await client.close()

    run(body)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=512), cuts=st.lists(st.integers(0, 512), max_size=6))
def test_decoder_fuzz_raises_only_frame_error(data: bytes, cuts: list[int]) -> None:
    decoder = FrameDecoder(max_frame_size=256)
    bounds = [0, *sorted(c for c in cuts if c <= len(data)), len(data)]
    try:
        for lo, hi in zip(bounds, bounds[1:]):
            decoder.feed(data[lo:hi])
    except FrameError:
        pass


_payloads = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=8) | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=16,
)


@settings(max_examples=200, deadline=None)
@given(payloads=st.lists(_payloads, max_size=5), chunk=st.integers(1, 64))
def test_frames_survive_any_chunking(payloads: list[Any], chunk: int) -> None:
    encoder = FrameEncoder()
    frames = [Request(0, "generate", None), *(Data(i, p) for i, p in enumerate(payloads)), End(9)]
    wire = b"".join(bytes(encoder.encode(f)) for f in frames)
    decoder = FrameDecoder()
    decoded = []
    for lo in range(0, len(wire), chunk):
        decoded += decoder.feed(wire[lo : lo + chunk])
    assert decoded == frames and decoder.buffered == 0


def test_stream_batches_hands_a_slow_consumer_everything_received_at_once() -> None:
    async def body() -> None:
        server = await started_server()
        client = RequestPlaneClient()
        try:
            batches = []
            items = client.stream_batches(server.address, "count", {"tag": "b", "n": 200})
            async for batch in items:
                batches.append(batch)
                await asyncio.sleep(0.01)  # a slow consumer: items pile up meanwhile
            flat = [item["i"] for batch in batches for item in batch]
            assert flat == list(range(200))  # nothing lost, duplicated or reordered
            assert all(batches) and len(batches) < 200  # ... and it caught up in fewer steps
        finally:
            await client.close()
            await server.stop(0)

    run(body)
