"""KV transfer server: serves a `TransferStore`'s held exports to pulling decode workers.

One connection carries one pull (wire.py). The server looks the transfer up, slices the
wanted blocks, and sends them either inline on the TCP stream or — when the client runs on the
same host and accepts it — through a shared-memory segment it copies the payload into once. A
pull acknowledged ok releases the transfer from the store ("pulled"); a failed, refused or
abandoned pull leaves it held for a retry until it expires.

Shared-memory lifetime: a segment is owned by the connection that filled it and, in a ``finally``,
unlinked — after the client's ack, on ack timeout, on disconnect, on error or on `stop`. With
``shm_pool_bytes`` > 0 a segment instead returns to the pool, but only after the client's
ShmDone (sent by `PulledBlocks.close` once the payload view is released); a client that never
says so gets its segment unlinked, never reused, so no open `PulledBlocks` ever sees its segment
refilled. `stop` unlinks the idle pool. A crashed server's segments are unlinked by its
multiprocessing resource tracker.

Big copies and checksums run in a worker thread, so a 100 MB pull does not stall the event loop.

Errors a client caused (unknown transfer, bad indices, shm across hosts) get an error response;
malformed or oversized messages close the connection. Nothing a client sends stops the server.

Fault injection, for tests only: ``TANDEM_FAULT_TRANSFER`` (``corrupt``, ``truncate`` or
``delay:SECONDS``, or ``file:PATH`` to re-read one of those from PATH at each pull; see faults.py),
read when the server is constructed, makes the pulls it serves corrupt, truncated or late. Off by
default, and then it costs nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory

import numpy as np
import xxhash

from tandem.protocols.kv_export import KVBlockExport
from tandem.runtime.request_plane.config import format_address
from tandem.transfer.faults import TransferFault, corrupt_runs, faults_from_env, truncate_runs
from tandem.transfer.metrics import TransferMetrics, default_metrics
from tandem.transfer.shm import SegmentPool, destroy_segment
from tandem.transfer.store import TransferStore
from tandem.transfer.wire import (
    HEADER_SIZE,
    PullAck,
    PullRequest,
    PullResponse,
    ShmDone,
    decode_client_message,
    encode_message,
    frame_length,
    host_id,
    payload_checksum,
)

logger = logging.getLogger(__name__)

_COPY_CHUNK = 1 << 20  # shm copy + checksum chunk: hashed while still in cache
_THREAD_BYTES = 8 * 2**20  # payloads from this size are copied / hashed off the event loop


@dataclass(frozen=True)
class KvTransferServerConfig:
    """Timeouts and limits of a `KvTransferServer`."""

    request_timeout_s: float = 10.0
    """Seconds a new connection may take to send its pull request before it is closed."""
    ack_timeout_s: float = 30.0
    """Seconds the client may take to verify the payload and acknowledge it; past this the pull
    counts as failed (the transfer stays held) and its shm segment is unlinked."""
    shm_lease_timeout_s: float = 60.0
    """With a pool: seconds a client may keep a segment mapped after its ack before the server
    gives up on reusing it and unlinks it instead."""
    shm_pool_bytes: int = 1 << 30
    """Idle shm segments kept for reuse (bytes). 0: a fresh segment per pull, unlinked on ack."""
    expire_interval_s: float = 1.0
    """How often the server releases the store's expired exports."""
    max_request_bytes: int = 4 * 2**20
    """Largest client message accepted; a bigger one closes the connection."""
    send_chunk_bytes: int = 4 * 2**20
    """TCP payload write size (each write waits for the socket to drain)."""

    def __post_init__(self) -> None:
        for name in ("request_timeout_s", "ack_timeout_s", "shm_lease_timeout_s", "expire_interval_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.shm_pool_bytes < 0 or self.max_request_bytes <= 0 or self.send_chunk_bytes <= 0:
            raise ValueError("shm_pool_bytes must be >= 0; max_request_bytes and send_chunk_bytes > 0")


class _RefusedError(Exception):
    """A pull the server answers with an error response (message goes to the client)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class KvTransferServer:
    """Serves pulls of ``store``'s exports on ``host:port`` (see module docstring)."""

    def __init__(
        self,
        store: TransferStore,
        host: str = "127.0.0.1",
        port: int = 0,
        config: KvTransferServerConfig | None = None,
        metrics: TransferMetrics | None = None,
    ) -> None:
        self.store = store
        self.host = host
        self.port = port
        self.config = config or KvTransferServerConfig()
        self.metrics = metrics or default_metrics()
        self.host_id = host_id()
        self.pool = SegmentPool(self.config.shm_pool_bytes)
        self.faults = faults_from_env()
        """Injected faults, for tests only (faults.py); None (the default) serves every pull honestly."""
        self._server: asyncio.Server | None = None
        self._address: str | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._expiry_task: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def address(self) -> str:
        """``host:port`` clients connect to (the real port when started with port 0)."""
        if self._address is None:
            raise RuntimeError("KV transfer server is not started")
        return self._address

    async def start(self) -> str:
        """Bind ``host:port`` (that host only) and serve; returns the address."""
        if self._server is not None:
            raise RuntimeError("KV transfer server already started")
        self._server = await asyncio.start_server(self._on_connection, self.host, self.port)
        self._address = format_address(self.host, self._server.sockets[0].getsockname()[1])
        self._expiry_task = asyncio.create_task(self._expire_periodically())
        logger.info("KV transfer server listening on %s", self._address)
        return self._address

    async def stop(self) -> None:
        """Stop accepting, abort pulls in flight (their segments are unlinked), empty the pool."""
        self._stopping = True
        if self._server is not None:
            self._server.close()
        for task in [*self._tasks, self._expiry_task]:
            if task is not None:
                task.cancel()
        await asyncio.gather(*self._tasks, *([self._expiry_task] if self._expiry_task else []), return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        self.pool.close()

    async def _expire_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.config.expire_interval_s)
            self.store.expire()

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if self._stopping:
            writer.close()
            return
        self._tasks.add(task)
        peer = writer.get_extra_info("peername")
        try:
            request = await self._read_request(reader, peer)
            if request is not None:
                await self._serve(request, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            logger.debug("KV transfer connection from %s lost: %r", peer, exc)
        except asyncio.CancelledError:
            if not self._stopping:
                raise
            # stop() cancelled this pull: end quietly (3.11's stream callback logs cancelled handlers)
        except Exception:
            logger.exception("KV transfer connection from %s failed", peer)
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _read_request(self, reader: asyncio.StreamReader, peer: object) -> PullRequest | None:
        try:
            message = await asyncio.wait_for(self._read_message(reader), self.config.request_timeout_s)
        except TimeoutError:
            logger.debug("KV transfer client %s sent no request in time", peer)
            return None
        except ValueError as exc:
            self.metrics.record_failure("server", "bad_request")
            logger.warning("KV transfer client %s sent a bad request: %s", peer, exc)
            return None
        if not isinstance(message, PullRequest):
            self.metrics.record_failure("server", "bad_request")
            logger.warning("KV transfer client %s opened with %s instead of a pull", peer, type(message).__name__)
            return None
        return message

    async def _read_message(self, reader: asyncio.StreamReader) -> PullRequest | PullAck | ShmDone:
        length = frame_length(await reader.readexactly(HEADER_SIZE), self.config.max_request_bytes)
        return decode_client_message(await reader.readexactly(length))

    async def _serve(self, request: PullRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        fault = self.faults.current() if self.faults is not None else None
        if fault is not None and fault.kind == "delay":
            await asyncio.sleep(fault.delay_s)
        export = self.store.get(request.transfer_id)
        try:
            if export is None:
                raise _RefusedError(f"unknown or expired transfer id {request.transfer_id!r}", "unknown_transfer")
            indices = _check_indices(request.block_indices, len(export.block_hashes))
            path = self._choose_path(request)
        except _RefusedError as exc:
            self.metrics.record_failure("server", exc.reason)
            writer.write(encode_message(PullResponse(ok=False, error=str(exc), transfer_id=request.transfer_id)))
            await writer.drain()
            return
        runs = _payload_runs(export, indices)
        header = _response_header(request.transfer_id, export, indices, sum(len(run) for run in runs))
        if path == "shm" and header.nbytes > 0 and not (fault is not None and fault.kind == "truncate"):
            await self._send_shm(header, runs, reader, writer, fault)
        else:
            await self._send_tcp(header, runs, reader, writer, fault)

    def _choose_path(self, request: PullRequest) -> str:
        same_host = request.host_id == self.host_id
        if request.path == "shm" and not same_host:
            raise _RefusedError(
                f"shared memory requested, but the client's host id {request.host_id!r} is not "
                f"this server's ({self.host_id!r}); pull with path 'tcp' or 'auto'",
                "shm_other_host",
            )
        if request.path == "shm" or (request.path == "auto" and same_host):
            return "shm"
        return "tcp"

    async def _send_tcp(
        self,
        header: PullResponse,
        runs: list[memoryview],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        fault: TransferFault | None = None,
    ) -> None:
        header.checksum = await _off_loop(header.nbytes, payload_checksum, *runs)
        if fault is not None and fault.kind != "delay":  # tests only: a bad payload under a good checksum
            runs = corrupt_runs(runs) if fault.kind == "corrupt" else truncate_runs(runs)
        writer.write(encode_message(header))
        chunk = self.config.send_chunk_bytes
        for run in runs:
            for start in range(0, len(run), chunk):
                writer.write(run[start : start + chunk])
                await writer.drain()
        await writer.drain()
        if fault is not None and fault.kind == "truncate":
            return  # hang up mid-payload (the connection handler closes the socket)
        await self._await_ack(header, reader)

    async def _send_shm(
        self,
        header: PullResponse,
        runs: list[memoryview],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        fault: TransferFault | None = None,
    ) -> None:
        segment = self.pool.acquire(header.nbytes)
        reusable = False
        try:
            header.checksum = await _off_loop(header.nbytes, _copy_and_hash, segment, runs)
            if fault is not None and fault.kind == "corrupt":  # tests only
                assert segment.buf is not None  # open: acquired above
                segment.buf[header.nbytes // 2] ^= 0xFF
            header.path, header.shm_name, header.shm_recycle = "shm", segment.name, self.pool.enabled
            writer.write(encode_message(header))
            await writer.drain()
            acked = await self._await_ack(header, reader)
            if acked and self.pool.enabled:
                reusable = await self._await_done(reader)
        finally:
            if reusable and not self._stopping:
                self.pool.recycle(segment)
            else:
                destroy_segment(segment)

    async def _await_ack(self, header: PullResponse, reader: asyncio.StreamReader) -> bool:
        """Wait for the client's verdict; an ok releases the transfer. True when ok."""
        try:
            message = await asyncio.wait_for(self._read_message(reader), self.config.ack_timeout_s)
        except TimeoutError:
            self.metrics.record_failure("server", "ack_timeout")
            logger.warning(
                "pull of transfer %r: no acknowledgement within %.1fs", header.transfer_id, self.config.ack_timeout_s
            )
            return False
        except (ValueError, ConnectionError, asyncio.IncompleteReadError) as exc:
            self.metrics.record_failure("server", "no_ack")
            logger.warning(
                "pull of transfer %r: connection ended without a valid acknowledgement (%s)",
                header.transfer_id,
                exc or type(exc).__name__,
            )
            return False
        if not isinstance(message, PullAck) or not message.ok:
            reason = message.error if isinstance(message, PullAck) else f"unexpected {type(message).__name__}"
            self.metrics.record_failure("server", "client_rejected")
            logger.warning("pull of transfer %r rejected by the client: %s", header.transfer_id, reason)
            return False
        self.store.release(header.transfer_id, "pulled")
        return True

    async def _await_done(self, reader: asyncio.StreamReader) -> bool:
        """True once the client says it is done reading the segment (so it may be reused)."""
        try:
            message = await asyncio.wait_for(self._read_message(reader), self.config.shm_lease_timeout_s)
        except (TimeoutError, ValueError, ConnectionError, asyncio.IncompleteReadError):
            return False
        return isinstance(message, ShmDone)


def _check_indices(block_indices: list[int] | None, num_blocks: int) -> list[int]:
    if block_indices is None:
        return list(range(num_blocks))
    bad = [index for index in block_indices if not 0 <= index < num_blocks]
    if bad:
        raise _RefusedError(
            f"block indices {bad[:8]} out of range: the transfer holds {num_blocks} blocks", "bad_indices"
        )
    if len(set(block_indices)) != len(block_indices):
        raise _RefusedError("block indices must be unique", "bad_indices")
    return list(block_indices)


def _payload_runs(export: KVBlockExport, indices: list[int]) -> list[memoryview]:
    """The wanted blocks' bytes as views, consecutive blocks merged into one run."""
    per_block = len(export.data) // len(export.block_hashes) if export.block_hashes else 0
    data = memoryview(export.data)
    runs: list[memoryview] = []
    start = 0
    for pos in range(1, len(indices) + 1):
        if pos == len(indices) or indices[pos] != indices[pos - 1] + 1:
            first, last = indices[start], indices[pos - 1]
            runs.append(data[first * per_block : (last + 1) * per_block])
            start = pos
    return runs


def _response_header(transfer_id: str, export: KVBlockExport, indices: list[int], nbytes: int) -> PullResponse:
    """Metadata of the returned blocks (checksum and path are filled in by the sender)."""
    size, hashes = export.block_size, export.block_hashes
    return PullResponse(
        ok=True,
        transfer_id=transfer_id,
        dtype=export.dtype,
        block_shape=list(export.block_shape),
        block_size=size,
        hash_seed=export.hash_seed,
        block_indices=indices,
        block_hashes=[hashes[i] for i in indices],
        parent_hashes=[hashes[i - 1] if i > 0 else None for i in indices],
        token_ids=[t for i in indices for t in export.token_ids[i * size : (i + 1) * size]],
        nbytes=nbytes,
    )


async def _off_loop(nbytes: int, function: Callable[..., int], *args: object) -> int:
    """Run a copy or checksum of ``nbytes`` in a thread when it is big enough to stall the event
    loop (numpy copies and xxhash release the GIL)."""
    if nbytes < _THREAD_BYTES:
        return function(*args)
    return await asyncio.to_thread(function, *args)


def _copy_and_hash(segment: SharedMemory, runs: list[memoryview]) -> int:
    """Copy the runs into the segment back to back, hashing each chunk while it is in cache."""
    hasher = xxhash.xxh3_64()
    offset = 0
    assert segment.buf is not None  # open: the caller holds it
    with memoryview(segment.buf) as buf:
        target = np.frombuffer(buf, dtype=np.uint8)
        for run in runs:
            source = np.frombuffer(run, dtype=np.uint8)
            for start in range(0, len(source), _COPY_CHUNK):
                piece = source[start : start + _COPY_CHUNK]
                end = offset + len(piece)
                np.copyto(target[offset:end], piece)
                hasher.update(buf[offset:end])
                offset = end
        del target
    return hasher.intdigest()
