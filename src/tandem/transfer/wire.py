"""Wire format of the KV block transfer service: msgspec messages in length-prefixed frames.

One pull is one TCP connection. Each message is a frame ``[u32 big-endian body length][msgpack
body]`` (the request plane's header, `tandem.runtime.request_plane.frames.HEADER`), the body a tagged msgspec
struct; nothing is ever unpickled. The exchange:

    client → server   PullRequest
    server → client   PullResponse; on path "tcp" exactly ``nbytes`` raw payload bytes follow
    client → server   PullAck (ok after the payload passed every integrity check)
    client → server   ShmDone (path "shm" with ``shm_recycle`` only, on `PulledBlocks.close`: the
                      client no longer reads the segment, so the server may reuse it)

The payload is the wanted blocks' raw bytes, block after block, in ``block_indices`` order; each
block is ``block_shape`` of ``dtype``. `host_id` tells whether client and server share a host
(and its /dev/shm), which decides whether the payload may travel through shared memory.
"""

from __future__ import annotations

import functools
import os
import socket
import uuid
from typing import Literal

import msgspec
import torch
import xxhash

from tandem.runtime.request_plane.frames import HEADER, HEADER_SIZE

PathChoice = Literal["auto", "tcp", "shm"]
"""Path a client accepts: "auto" (shm on the same host, else tcp), or a forced one."""

MAX_MESSAGE_BYTES = 64 * 2**20
"""Largest message body either side accepts (a response header carries one token id and a few
hashes per block, so even a million-token prompt stays far below this)."""


class TransferError(RuntimeError):
    """A pull failed: server error, unknown transfer, integrity mismatch, truncation, timeout.

    ``reason`` is a short machine-readable label (also the metrics label)."""

    def __init__(self, message: str, reason: str = "error") -> None:
        super().__init__(message)
        self.reason = reason


class PullRequest(msgspec.Struct, tag="pull", forbid_unknown_fields=True):
    """Ask for the blocks of a held transfer."""

    transfer_id: str
    block_indices: list[int] | None = None
    """Positions (in the held export) of the blocks wanted, unique; None means all blocks.
    The decode side lists only the blocks its prefix cache lacks."""
    host_id: str = ""
    """The client's `host_id()`; shared memory is used only when it equals the server's."""
    path: PathChoice = "auto"


class PullResponse(msgspec.Struct, tag="resp"):
    """The server's answer: an error, or the metadata of the payload that follows."""

    ok: bool
    error: str = ""
    transfer_id: str = ""
    dtype: str = ""
    """torch dtype name of the payload, e.g. 'float32'."""
    block_shape: list[int] = []
    """[layers, 2, block_size, kv_heads, head_dim] of one block."""
    block_size: int = 0
    hash_seed: int = 0
    block_indices: list[int] = []
    """Positions of the returned blocks in the held export, in payload order."""
    block_hashes: list[int] = []
    """Sequence hashes of the returned blocks."""
    parent_hashes: list[int | None] = []
    """Sequence hash of the block before each returned block in the held export (None for block
    0), so the client can check the hash chain of any subset of blocks."""
    token_ids: list[int] = []
    """Tokens of the returned blocks, concatenated."""
    nbytes: int = 0
    checksum: int = 0
    """xxh3_64 (seed 0) of the payload."""
    path: Literal["tcp", "shm"] = "tcp"
    shm_name: str = ""
    """Shared-memory segment holding the payload at offset 0 (path "shm")."""
    shm_recycle: bool = False
    """The server reuses the segment once the client sends ShmDone (else it unlinks it on ack)."""


class PullAck(msgspec.Struct, tag="ack"):
    """The client's verdict on the payload: ok releases the transfer on the server."""

    ok: bool
    error: str = ""


class ShmDone(msgspec.Struct, tag="done"):
    """The client has released its payload view of the shm segment it was given (it may keep the
    segment mapped for the next pull that reuses it, but never reads it again for this one)."""


ClientMessage = PullRequest | PullAck | ShmDone
ServerMessage = PullResponse

_encoder = msgspec.msgpack.Encoder()
_client_decoder = msgspec.msgpack.Decoder(ClientMessage)
_server_decoder = msgspec.msgpack.Decoder(ServerMessage)


def encode_message(message: PullRequest | PullAck | ShmDone | PullResponse) -> bytes:
    """One frame: length header + msgpack body."""
    body = _encoder.encode(message)
    return HEADER.pack(len(body)) + body


def frame_length(header: bytes | bytearray | memoryview, max_bytes: int = MAX_MESSAGE_BYTES) -> int:
    """Body length announced by a frame header; ValueError when above ``max_bytes``."""
    length: int
    (length,) = HEADER.unpack(header)
    if length > max_bytes:
        raise ValueError(f"peer announced a {length}-byte message; the maximum is {max_bytes}")
    return length


def decode_client_message(body: bytes | bytearray | memoryview) -> PullRequest | PullAck | ShmDone:
    """Decode a client → server body; ValueError (with the cause) when malformed."""
    try:
        return _client_decoder.decode(body)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise ValueError(f"malformed client message ({len(body)} bytes): {exc}") from None


def decode_server_message(body: bytes | bytearray | memoryview) -> PullResponse:
    """Decode a server → client body; ValueError (with the cause) when malformed."""
    try:
        return _server_decoder.decode(body)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise ValueError(f"malformed server message ({len(body)} bytes): {exc}") from None


def dtype_itemsize(dtype: str) -> int:
    """Bytes per element of a torch dtype name; ValueError for unknown names."""
    value = getattr(torch, dtype, None) if dtype and not dtype.startswith("_") else None
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown KV dtype {dtype!r}")
    return value.itemsize


def block_nbytes(block_shape: list[int], dtype: str) -> int:
    """Bytes of one block of ``block_shape`` elements of ``dtype``."""
    if any(dim < 0 for dim in block_shape):
        raise ValueError(f"negative dimension in block shape {block_shape}")
    numel = 1
    for dim in block_shape:
        numel *= dim
    return numel * dtype_itemsize(dtype)


def payload_checksum(*chunks: bytes | bytearray | memoryview) -> int:
    """xxh3_64 of the concatenation of ``chunks`` (what PullResponse.checksum holds)."""
    hasher = xxhash.xxh3_64()
    for chunk in chunks:
        hasher.update(chunk)
    return hasher.intdigest()


@functools.cache
def host_id() -> str:
    """Identity of this host's shared memory: equal for two processes that can open each other's
    /dev/shm segments, different across hosts.

    Combines /etc/machine-id (stable per installation), the kernel boot id (differs across hosts
    even when containers share an image's machine-id) and the device number of /dev/shm (differs
    between containers on one host that each mount their own). Falls back to the hostname and MAC
    address where these files do not exist."""
    parts = [
        _read_first_line("/etc/machine-id") or _read_first_line("/var/lib/dbus/machine-id"),
        _read_first_line("/proc/sys/kernel/random/boot_id"),
    ]
    try:
        parts.append(str(os.stat("/dev/shm").st_dev))
    except OSError:
        pass
    if not any(parts[:2]):
        parts += [socket.gethostname(), f"{uuid.getnode():012x}"]
    return f"{xxhash.xxh3_64_intdigest('|'.join(parts).encode()):016x}"


def _read_first_line(path: str) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            return handle.readline().strip()
    except OSError:
        return ""


__all__ = [
    "HEADER",
    "HEADER_SIZE",
    "MAX_MESSAGE_BYTES",
    "ClientMessage",
    "PathChoice",
    "PullAck",
    "PullRequest",
    "PullResponse",
    "ShmDone",
    "TransferError",
    "block_nbytes",
    "decode_client_message",
    "decode_server_message",
    "dtype_itemsize",
    "encode_message",
    "frame_length",
    "host_id",
    "payload_checksum",
]
