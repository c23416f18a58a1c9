"""Request-plane overhead: streamed items/s over one connection at concurrency 1, 8 and 64.

A worker process serves ``stream`` (yields N small items, no work in between) on 127.0.0.1; this
process opens one `RequestPlaneClient` connection and runs C concurrent streams in a loop for a
fixed time. Baseline, measured in the same run: a bare asyncio server in a child process writes
the same Data frames down one socket as fast as it can (64 frames per write) and this process
decodes them with the same `FrameDecoder` — the ceiling for Python + TCP without streams, tasks
or multiplexing.

Also reports the round-trip latency of one ``call`` (concurrency 1), the fixed cost the request
plane adds per request, beside a ``ping`` round trip on the same connection as its floor.

Usage: python benchmarks/request_plane_overhead.py [--items 100] [--seconds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from typing import Any

from tandem.runtime.request_plane import RequestContext, RequestPlaneClient, RequestPlaneServer
from tandem.runtime.request_plane.frames import Data, FrameDecoder, FrameEncoder

ITEM = {"token_ids": [12345], "finish_reason": None}  # one decode step's delta


async def serve_request_plane() -> None:
    """Child: serve ``stream`` and ``echo`` until stdin closes."""

    async def stream(payload: dict[str, Any], ctx: RequestContext):
        for index in range(payload["n"]):
            yield {**ITEM, "index": index}

    async def echo(payload: Any, ctx: RequestContext) -> Any:
        return payload

    server = RequestPlaneServer("127.0.0.1", 0)
    server.register("stream", stream)
    server.register("echo", echo)
    await server.start()
    await wait_for_stdin_eof(server.address)
    await server.stop(0)


async def serve_raw(total_items: int) -> None:
    """Child (baseline): on connect, write ``total_items`` Data frames, then close."""
    encoder = FrameEncoder()

    async def blast(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        batch: list[bytes] = []
        for index in range(total_items):
            batch.append(encoder.encode(Data(1, {**ITEM, "index": index})))
            if len(batch) == 64:  # batched writes, as the server's write coalescing does
                writer.write(b"".join(batch))
                batch.clear()
                await writer.drain()
        writer.write(b"".join(batch))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(blast, "127.0.0.1", 0)
    await wait_for_stdin_eof(f"127.0.0.1:{server.sockets[0].getsockname()[1]}")
    server.close()


async def wait_for_stdin_eof(address: str) -> None:
    print(address, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


def spawn(*args: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, __file__, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def stop(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait(timeout=10)


async def bench_raw(address: str, total_items: int) -> float:
    """Items/s of the baseline: decode a raw stream of Data frames."""
    host, port = address.rsplit(":", 1)
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, int(port))
    decoder, received = FrameDecoder(), 0
    while data := await reader.read(256 * 1024):
        received += len(decoder.feed(data))
    elapsed = time.perf_counter() - start
    writer.close()
    assert received == total_items, received
    return received / elapsed


async def bench_streams(address: str, concurrency: int, items: int, seconds: float) -> dict[str, float]:
    """C workers each run streams of ``items`` items back to back until the deadline."""
    client = RequestPlaneClient()
    await client.call(address, "echo", 0)  # connect + warm up
    deadline = time.perf_counter() + seconds
    counts = [0] * concurrency

    async def worker(slot: int) -> None:
        while time.perf_counter() < deadline:
            async for _ in client.stream(address, "stream", {"n": items}):
                counts[slot] += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker(slot) for slot in range(concurrency)))
    elapsed = time.perf_counter() - start
    await client.close()
    return {"items_per_s": sum(counts) / elapsed, "streams": sum(counts) / items}


async def bench_call_latency(address: str, num_calls: int = 2000) -> tuple[float, float]:
    """Median round trip in microseconds of one ``call`` and, as its floor, of one ``ping``
    (a Ping/Pong frame pair through the same connection, no stream, no handler task)."""
    client = RequestPlaneClient()
    await client.call(address, "echo", ITEM)
    call_times, ping_times = [], []
    for _ in range(num_calls):
        start = time.perf_counter()
        await client.call(address, "echo", ITEM)
        call_times.append(time.perf_counter() - start)
        ping_times.append(await client.ping(address))
    await client.close()
    return statistics.median(call_times) * 1e6, statistics.median(ping_times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=100, help="items per stream")
    parser.add_argument("--seconds", type=float, default=2.0, help="time per concurrency level")
    parser.add_argument("--serve", choices=["plane", "raw"], help=argparse.SUPPRESS)
    parser.add_argument("--raw-items", type=int, default=200_000, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve == "plane":
        return asyncio.run(serve_request_plane())
    if args.serve == "raw":
        return asyncio.run(serve_raw(args.raw_items))

    raw_proc, raw_address = spawn("--serve", "raw", "--raw-items", str(args.raw_items))
    try:
        baseline = asyncio.run(bench_raw(raw_address, args.raw_items))
    finally:
        stop(raw_proc)
    print(f"baseline (raw frames, one socket, no streams): {baseline:12,.0f} items/s")

    proc, address = spawn("--serve", "plane")
    try:
        call_us, ping_us = asyncio.run(bench_call_latency(address))
        print(
            f"call() round trip, concurrency 1: median {call_us:.0f} µs "
            f"(ping floor {ping_us:.0f} µs, {call_us / ping_us:.2f}x)"
        )
        for concurrency in (1, 8, 64):
            result = asyncio.run(bench_streams(address, concurrency, args.items, args.seconds))
            print(
                f"concurrency {concurrency:3d}: {result['items_per_s']:12,.0f} items/s "
                f"({result['streams']:,.0f} streams of {args.items}) "
                f"= {result['items_per_s'] / baseline:.2f}x baseline"
            )
    finally:
        stop(proc)


if __name__ == "__main__":
    main()
