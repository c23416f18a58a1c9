"""Helpers every test tier shares: run an async body under a deadline, wait for a condition,
pick a free loopback port, build a worker card or a BlockStored event.

Plain functions rather than fixtures, so that helper modules and subprocess scripts can use them
too; the fixtures (``tiny_loaded``, the etcd/NATS servers) live in conftest files.
"""

from __future__ import annotations

import asyncio
import inspect
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from tandem.protocols.block_hash import block_hashes
from tandem.protocols.kv_events import BlockStored
from tandem.protocols.worker_card import WorkerCard

T = TypeVar("T")


def run(work: Awaitable[T] | Callable[[], Awaitable[T]], timeout: float = 60.0) -> T:
    """Run an async test body (a coroutine, or a function that makes one) on a fresh event loop,
    failing with TimeoutError after ``timeout`` seconds so that a hung test cannot hang the suite."""

    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await (work() if callable(work) else work)

    return asyncio.run(bounded())


async def wait_until(
    predicate: Callable[[], bool | Awaitable[bool]],
    timeout: float = 5.0,
    what: str | Callable[[], str] = "the condition",
    *,
    interval: float = 0.01,
) -> float:
    """Poll ``predicate`` (plain or async) until it is true; return the seconds that took.
    Raises AssertionError naming ``what`` (a string, or a function giving details at that
    moment) once ``timeout`` seconds have passed."""
    start = time.monotonic()
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what() if callable(what) else what} not reached within {timeout} s")
        await asyncio.sleep(interval)


def poll_until(
    predicate: Callable[[], bool], timeout: float = 10.0, *, interval: float = 0.02, what: str = "the condition"
) -> float:
    """`wait_until` for code outside an event loop (a server running in another thread)."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(interval)
    return time.monotonic() - start


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (bound, then released)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def card(worker_id: str = "w1", model: str = "m", **overrides: Any) -> WorkerCard:
    """A worker card with small, valid, deterministic defaults; pass any field to override it."""
    fields: dict[str, Any] = {
        "worker_id": worker_id,
        "model": model,
        "tokenizer": model,
        "chat_template": model,
        "context_length": 128,
        "block_size": 16,
        "total_kv_blocks": 64,
        "request_plane_address": "127.0.0.1:9",
        "started_at": 1700000000.0,  # fixed, so two cards built alike are equal
    }
    fields.update(overrides)
    return WorkerCard(**fields)


def block_stored(tokens: list[int], parent_tokens: list[int] | None = None, block_size: int = 16) -> BlockStored:
    """A BlockStored event for ``tokens`` (whole blocks) continuing ``parent_tokens``."""
    prefix = parent_tokens or []
    hashes = block_hashes(prefix + tokens, block_size)
    parent = hashes[len(prefix) // block_size - 1] if prefix else None
    return BlockStored(
        block_hashes=hashes[len(prefix) // block_size :],
        parent_block_hash=parent,
        token_ids=tokens,
        block_size=block_size,
    )


async def worker_stats(address: str) -> dict[str, Any]:
    """A worker's ``stats`` endpoint (EngineStats plus its disaggregation figures), over the request plane."""
    from tandem.runtime.request_plane import RequestPlaneClient

    rpc = RequestPlaneClient()
    try:
        stats: dict[str, Any] = await rpc.call(address, "stats", None)
        return stats
    finally:
        await rpc.close()


def router_status(url: str) -> dict[str, Any]:
    """A frontend's ``/router/status`` (``url``: its base URL)."""
    import json
    import urllib.request

    with urllib.request.urlopen(url + "/router/status", timeout=10) as response:
        status: dict[str, Any] = json.loads(response.read())
        return status
