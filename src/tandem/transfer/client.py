"""KV transfer client: pull a held transfer's blocks from a prefill worker's `KvTransferServer`.

`pull_blocks` returns `PulledBlocks`, whose ``payload`` is a read-only memoryview the caller copies
from without an extra copy: over the shared-memory segment (path "shm") or over the buffer the
socket was read straight into (path "tcp", an `asyncio.BufferedProtocol`, so no stream-buffer
copies). It stays valid until `PulledBlocks.close` (use it as a context manager).

Nothing the server sends is trusted: the payload size must equal blocks × the block size implied
by ``block_shape`` and ``dtype`` and the announced ``nbytes``, its xxh3_64 must match the
announced checksum, and the blocks' hashes must follow from their tokens (`verify_block_hashes`
for a prefix from block 0; the same chain continued from each block's parent for any other
subset). Any failure, truncation, timeout or server error raises `TransferError`; the ack then
tells the server the pull failed, so the transfer stays held for a retry.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from multiprocessing.shared_memory import SharedMemory

import numpy as np
import xxhash

from tandem.kernels.block_hash import block_hashes
from tandem.protocols.kv_export import KVBlockExport, verify_block_hashes
from tandem.runtime.request_plane.config import parse_address
from tandem.transfer.metrics import TransferMetrics, default_metrics
from tandem.transfer.shm import attach_cache, attach_segment, detach_segment
from tandem.transfer.wire import (
    HEADER_SIZE,
    PathChoice,
    PullAck,
    PullRequest,
    PullResponse,
    ShmDone,
    TransferError,
    block_nbytes,
    decode_server_message,
    encode_message,
    frame_length,
    host_id,
)

logger = logging.getLogger(__name__)


class PulledBlocks:
    """Blocks received by `pull_blocks`: the response metadata and a zero-copy payload view."""

    def __init__(
        self,
        header: PullResponse,
        payload: memoryview,
        transport: asyncio.Transport | None,
        segment: SharedMemory | None = None,
    ) -> None:
        self.header = header
        self.payload = payload
        """Raw bytes of the blocks, block after block (read-only; valid until `close`)."""
        self._transport = transport
        self._segment = segment

    @property
    def transfer_id(self) -> str:
        return self.header.transfer_id

    @property
    def path(self) -> str:
        """ "tcp" or "shm": how the payload travelled."""
        return self.header.path

    @property
    def block_indices(self) -> list[int]:
        return self.header.block_indices

    @property
    def nbytes(self) -> int:
        return self.header.nbytes

    @property
    def num_blocks(self) -> int:
        return len(self.header.block_hashes)

    def block(self, position: int) -> memoryview:
        """The bytes of the ``position``-th returned block."""
        size = self.nbytes // self.num_blocks if self.num_blocks else 0
        return self.payload[position * size : (position + 1) * size]

    def to_export(self, copy: bool = True) -> KVBlockExport:
        """The returned blocks as a `KVBlockExport`. ``copy``: ``data`` is a copy of the payload;
        else it is the payload view itself (no copy; only valid until `close`).

        A run not starting at block 0 carries its first block's parent (``parent_hash``); blocks
        that are not one contiguous run cannot form one export (ValueError)."""
        header = self.header
        indices = self.block_indices
        if any(later - earlier != 1 for earlier, later in zip(indices, indices[1:])):
            raise ValueError(f"blocks {indices} are not one contiguous run: pull them as separate runs")
        parent = header.parent_hashes[0] if header.parent_hashes else None
        return KVBlockExport(
            header.block_size,
            header.dtype,
            list(header.block_shape),
            header.hash_seed,
            list(header.block_hashes),
            list(header.token_ids),
            # KVBlockExport.data is typed bytes (its msgspec wire schema) but documented to take any
            # buffer in process: the uncopied payload is a memoryview, as intended.
            bytes(self.payload) if copy else self.payload,  # type: ignore[arg-type]
            parent,
        )

    def close(self) -> None:
        """Release the payload; for a pooled shm segment, tell the server it may reuse it (the
        mapping stays cached here), else unmap it. Views taken of ``payload`` must not be used
        after this."""
        try:
            self.payload.release()
        except BufferError:  # a view of it is still referenced (e.g. by a traceback): GC frees it
            logger.debug("pulled payload of %s still has views at close", self.transfer_id)
        segment, self._segment = self._segment, None
        if segment is not None and not self.header.shm_recycle:
            detach_segment(segment)
        transport, self._transport = self._transport, None
        if transport is not None and not transport.is_closing():
            if segment is not None and self.header.shm_recycle:
                transport.write(encode_message(ShmDone()))
            transport.close()

    def __enter__(self) -> PulledBlocks:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


async def pull_blocks(
    address: str,
    transfer_id: str,
    block_indices: list[int] | None = None,
    *,
    path: PathChoice = "auto",
    timeout_s: float = 30.0,
    metrics: TransferMetrics | None = None,
) -> PulledBlocks:
    """Pull a transfer's blocks (all, or ``block_indices``) from the server at ``address``.

    ``path``: "auto" uses shared memory when the server shares this host (falling back to TCP if
    the segment is not visible here), "tcp" / "shm" force one. Raises `TransferError`."""
    if path not in ("auto", "tcp", "shm"):
        raise ValueError(f"path must be 'auto', 'tcp' or 'shm', got {path!r}")
    if not isinstance(transfer_id, str):
        raise TypeError(f"transfer_id must be a str, got {type(transfer_id).__name__}")
    if block_indices is not None:
        block_indices = [int(index) for index in block_indices]  # numpy ints, ranges, tuples
    metrics = metrics or default_metrics()
    start = time.perf_counter()
    try:
        try:
            pulled = await _pull_once(address, transfer_id, block_indices, path, timeout_s)
        except _ShmUnavailableError as exc:
            if path != "auto":
                raise TransferError(str(exc), "shm_attach") from None
            logger.info("%s; pulling %r over TCP instead", exc, transfer_id)
            pulled = await _pull_once(address, transfer_id, block_indices, "tcp", timeout_s)
    except TransferError as exc:
        metrics.record_failure("client", exc.reason)
        raise
    metrics.record_pull(pulled.path, pulled.nbytes, time.perf_counter() - start)
    return pulled


class _ShmUnavailableError(Exception):
    """The server's segment cannot be opened here (the pull may be retried over TCP)."""


async def _pull_once(
    address: str, transfer_id: str, block_indices: list[int] | None, path: PathChoice, timeout_s: float
) -> PulledBlocks:
    try:
        host, port = parse_address(address)
    except ValueError as exc:
        raise TransferError(str(exc), "bad_address") from None
    loop = asyncio.get_running_loop()
    protocol: _PullProtocol | None = None
    transport = None
    try:
        async with asyncio.timeout(timeout_s):
            transport, protocol = await loop.create_connection(_PullProtocol, host, port)
            request = PullRequest(transfer_id, block_indices, host_id(), path)
            transport.write(encode_message(request))
            header = await protocol.header
            _check_header(header, address, transfer_id, block_indices)
            if header.path == "shm":
                return _finish_shm(header, transport)
            payload = await protocol.payload
            return _finish_tcp(header, payload, protocol.checksum(), transport)
    except TimeoutError:
        _abort(transport, protocol)
        raise TransferError(
            f"pull of transfer {transfer_id!r} from {address} timed out after {timeout_s}s", "timeout"
        ) from None
    except OSError as exc:
        _abort(transport, protocol)
        raise TransferError(f"pull of transfer {transfer_id!r} from {address} failed: {exc}", "connection") from None
    except BaseException:
        _abort(transport, protocol)
        raise


def _finish_tcp(header: PullResponse, payload: memoryview, checksum: int, transport: asyncio.Transport) -> PulledBlocks:
    try:
        _check_checksum(header, checksum)
        _check_hashes(header)
    except TransferError as exc:
        _reject(transport, exc)
        raise
    transport.write(encode_message(PullAck(ok=True)))
    transport.close()  # flushes the ack first
    return PulledBlocks(header, payload.toreadonly(), None)


def _finish_shm(header: PullResponse, transport: asyncio.Transport) -> PulledBlocks:
    try:
        segment = attach_cache.attach(header.shm_name) if header.shm_recycle else attach_segment(header.shm_name)
    except (FileNotFoundError, ValueError) as exc:
        _reject(transport, TransferError(f"cannot open shm segment {header.shm_name!r}: {exc}", "shm_attach"))
        raise _ShmUnavailableError(
            f"shared memory segment {header.shm_name!r} of transfer {header.transfer_id!r} is not visible here ({exc})"
        ) from None
    payload = None
    try:
        if segment.size < header.nbytes:
            raise TransferError(
                f"shm segment {header.shm_name!r} holds {segment.size} bytes, the response announced {header.nbytes}",
                "truncated",
            )
        assert segment.buf is not None  # just attached
        payload = segment.buf[: header.nbytes].toreadonly()
        _check_checksum(header, xxhash.xxh3_64_intdigest(payload))
        _check_hashes(header)
    except TransferError as exc:
        if payload is not None:
            payload.release()
        if header.shm_recycle:
            attach_cache.forget(header.shm_name)
        else:
            detach_segment(segment)
        _reject(transport, exc)
        raise
    transport.write(encode_message(PullAck(ok=True)))
    if not header.shm_recycle:
        transport.close()
        return PulledBlocks(header, payload, None, segment)
    return PulledBlocks(header, payload, transport, segment)


def _check_header(header: PullResponse, address: str, transfer_id: str, wanted: list[int] | None) -> None:
    """Everything checkable before the payload: refusal, echoes, counts and sizes."""
    if not header.ok:
        raise TransferError(
            f"server {address} refused pull of transfer {transfer_id!r}: {header.error}", "server_error"
        )
    n = len(header.block_indices)
    if header.transfer_id != transfer_id or (wanted is not None and list(wanted) != header.block_indices):
        raise TransferError(
            f"server {address} answered for transfer {header.transfer_id!r} blocks "
            f"{header.block_indices[:8]}..., not the ones asked for",
            "protocol",
        )
    counts = (len(header.block_hashes), len(header.parent_hashes), len(header.token_ids))
    if header.block_size <= 0 or counts != (n, n, n * header.block_size):
        raise TransferError(
            f"response for transfer {transfer_id!r} lists {n} blocks but {counts[0]} hashes, "
            f"{counts[1]} parents and {counts[2]} tokens (block size {header.block_size})",
            "protocol",
        )
    try:
        expected = n * block_nbytes(list(header.block_shape), header.dtype)
    except ValueError as exc:
        raise TransferError(f"response for transfer {transfer_id!r}: {exc}", "protocol") from None
    if header.nbytes != expected:
        raise TransferError(
            f"response for transfer {transfer_id!r} announces {header.nbytes} bytes, but {n} blocks "
            f"of {header.block_shape} {header.dtype} are {expected}",
            "size_mismatch",
        )


def _check_checksum(header: PullResponse, actual: int) -> None:
    if actual != header.checksum:
        raise TransferError(
            f"payload of transfer {header.transfer_id!r} ({header.nbytes} bytes over "
            f"{header.path}) is corrupt: xxh3_64 {actual:016x}, expected {header.checksum:016x}",
            "checksum",
        )


def _check_hashes(header: PullResponse) -> None:
    """The returned blocks' hashes follow from their tokens (and their parents' hashes)."""
    indices, size, seed = header.block_indices, header.block_size, header.hash_seed
    try:
        if indices == list(range(len(indices))):
            verify_block_hashes(
                KVBlockExport(size, header.dtype, header.block_shape, seed, header.block_hashes, header.token_ids, b""),
                block_hashes,
            )
            return
        start = 0
        for pos in range(1, len(indices) + 1):
            if pos < len(indices) and indices[pos] == indices[pos - 1] + 1:
                if header.parent_hashes[pos] != header.block_hashes[pos - 1]:
                    raise ValueError(f"block {indices[pos]}'s parent hash is not block {indices[pos - 1]}'s hash")
                continue
            tokens = header.token_ids[start * size : pos * size]
            if block_hashes(tokens, size, seed, header.parent_hashes[start]) != header.block_hashes[start:pos]:
                raise ValueError(
                    f"block hashes of blocks {indices[start]}..{indices[pos - 1]} do not match their tokens"
                )
            start = pos
    except (ValueError, OverflowError, struct.error) as exc:  # out-of-range ids or hashes cannot match either
        raise TransferError(f"transfer {header.transfer_id!r}: {exc}", "hash_mismatch") from None


def _reject(transport: asyncio.Transport, exc: TransferError) -> None:
    """Tell the server the pull failed (the transfer stays held), then hang up."""
    if not transport.is_closing():
        transport.write(encode_message(PullAck(ok=False, error=str(exc))))
        transport.close()


def _abort(transport: asyncio.BaseTransport | None, protocol: _PullProtocol | None) -> None:
    if protocol is not None:
        protocol.abandon()
    if transport is not None and not transport.is_closing():
        transport.close()


class _PullProtocol(asyncio.BufferedProtocol):
    """Receives one response: frame header, message, then the TCP payload straight into its buffer."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.header: asyncio.Future[PullResponse] = loop.create_future()
        self.payload: asyncio.Future[memoryview] = loop.create_future()
        self._target = memoryview(bytearray(HEADER_SIZE))  # what the socket reads into next
        self._filled = 0
        self._stage = "length"
        self._hasher = xxhash.xxh3_64()
        self._buffer: np.ndarray | None = None

    def checksum(self) -> int:
        return self._hasher.intdigest()

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._stage == "done":
            return memoryview(bytearray(max(sizehint, 1 << 12)))  # anything past the end is an error
        return self._target[self._filled :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._stage == "done":
            self._fail(TransferError("server sent bytes past the end of the payload", "protocol"))
            return
        if self._stage == "payload":
            self._hasher.update(self._target[self._filled : self._filled + nbytes])  # still in cache
        self._filled += nbytes
        if self._filled == len(self._target):
            try:
                self._advance()
            except (ValueError, TransferError) as exc:
                reason = exc.reason if isinstance(exc, TransferError) else "protocol"
                self._fail(TransferError(f"bad response from server: {exc}", reason))

    def _advance(self) -> None:
        """The current stage's bytes are complete: move to the next stage."""
        if self._stage == "length":
            self._expect("message", memoryview(bytearray(frame_length(self._target))))
        elif self._stage == "message":
            header = decode_server_message(self._target)
            self.header.set_result(header)
            if header.ok and header.path == "tcp" and header.nbytes > 0:
                # np.empty: large buffers get transparent huge pages, so first touch is cheap.
                self._buffer = np.empty(header.nbytes, dtype=np.uint8)
                self._expect("payload", self._buffer.data.cast("B"))  # .data: the array's memoryview
            else:
                self._finish(memoryview(b""))
        else:
            self._finish(self._target)

    def _expect(self, stage: str, target: memoryview) -> None:
        self._stage, self._target, self._filled = stage, target, 0
        if len(target) == 0:
            self._advance()

    def _finish(self, payload: memoryview) -> None:
        self._stage = "done"
        if not self.payload.done():
            self.payload.set_result(payload)

    def _fail(self, exc: TransferError) -> None:
        """Fail whichever future the caller awaits now (the later one is cancelled: never awaited)."""
        self._stage = "done"
        if not self.header.done():
            self.header.set_exception(exc)
            self.payload.cancel()
        elif not self.payload.done():
            self.payload.set_exception(exc)

    def abandon(self) -> None:
        """The caller gave up on this response: nothing more is reported."""
        self._stage = "done"
        for future in (self.header, self.payload):
            future.cancel()

    def eof_received(self) -> bool:
        self._lost(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(exc)

    def _lost(self, exc: Exception | None) -> None:
        if self._stage == "done":
            return
        cause = f" ({exc})" if exc else ""
        if self._stage == "payload":
            message = f"connection closed after {self._filled} of {len(self._target)} payload bytes{cause}"
        else:
            message = f"connection closed before the response was complete{cause}"
        self._fail(TransferError(message, "truncated"))
