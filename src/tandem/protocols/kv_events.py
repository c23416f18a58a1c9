"""KV cache events in vLLM's wire format.

An engine reports what its block pool stores and evicts so a KV-aware router can index it.
The structs mirror vLLM's ``EventBatch``/``BlockStored``/``BlockRemoved``/``AllBlocksCleared``
(msgspec, array-like, tagged union) so the router can index Tandem and vLLM workers alike.
`decode_batch` also reads the shape vLLM publishes since mid-2026: each event a tagged *map*
(``{"type": "BlockStored", ...}``) with fields added over time (``lora_name``, ``extra_keys``,
``group_idx``, ...) and block hashes that may be 32-byte digests; unknown fields are ignored and
byte hashes become the same 64-bit ints vLLM's integer mode publishes.
On the wire a batch travels as ZMQ frames ``[topic, seq (8-byte big-endian), msgpack(batch)]``.
Block hashes are the contract's sequence hashes (``tandem.protocols.block_hash``), which fit in uint64.
"""

from __future__ import annotations

import struct
import time

import msgspec

SEQ_FRAME = struct.Struct(">q")
"""The frame after the topic: the batch's sequence number, 8-byte big-endian signed."""
END_OF_REPLAY = -1
"""The sequence number of the replay socket's end marker (with an empty payload)."""

MEDIUM_GPU = "GPU"  # vLLM's name for the engine's own pool, used on CPU devices too
MEDIUM_CPU = "CPU"
MEDIUM_DISK = "DISK"


class KVCacheEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    """Base of the tagged union; the tag is the class name."""


class BlockStored(KVCacheEvent):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = MEDIUM_GPU


class BlockRemoved(KVCacheEvent):
    block_hashes: list[int]
    medium: str | None = MEDIUM_GPU


class AllBlocksCleared(KVCacheEvent):
    pass


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


class KVEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[KVEvent]
    data_parallel_rank: int | None = None


def make_batch(events: list[KVEvent]) -> KVEventBatch:
    return KVEventBatch(ts=time.time(), events=list(events))


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(KVEventBatch)


def encode_batch(batch: KVEventBatch) -> bytes:
    return _encoder.encode(batch)


def decode_batch(payload: bytes) -> KVEventBatch:
    """Decode a msgpack EventBatch, in the array shape (Tandem, older vLLM) or vLLM's map shape;
    raises msgspec.DecodeError on malformed input (never unpickles)."""
    try:
        return _decoder.decode(payload)  # the fast path: every event an array
    except msgspec.ValidationError:
        pass  # some event is a map (or the batch is invalid: the slow path says which)
    raw = _raw_decoder.decode(payload)
    events = [_decode_event(event) for event in raw.events]
    return KVEventBatch(ts=raw.ts, events=events, data_parallel_rank=raw.data_parallel_rank)


# --- vLLM's map-shaped events -------------------------------------------------------------------

_HASH_MASK = (1 << 64) - 1
_MSGPACK_MAP_FIRST_BYTES = frozenset(range(0x80, 0x90)) | {0xDE, 0xDF}

BlockHashOnWire = int | bytes
"""vLLM publishes a block hash as an int, or (its default) as the raw digest bytes."""


class _MapBlockStored(msgspec.Struct, tag="BlockStored", omit_defaults=True, gc=False):
    block_hashes: list[BlockHashOnWire]
    parent_block_hash: BlockHashOnWire | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = MEDIUM_GPU


class _MapBlockRemoved(msgspec.Struct, tag="BlockRemoved", omit_defaults=True, gc=False):
    block_hashes: list[BlockHashOnWire]
    medium: str | None = MEDIUM_GPU


class _MapAllBlocksCleared(msgspec.Struct, tag="AllBlocksCleared", omit_defaults=True, gc=False):
    pass


class _RawBatch(msgspec.Struct, array_like=True, gc=False):
    ts: float
    events: list[msgspec.Raw]
    data_parallel_rank: int | None = None


_raw_decoder = msgspec.msgpack.Decoder(_RawBatch)
_array_event_decoder = msgspec.msgpack.Decoder(KVEvent)
_map_event_decoder = msgspec.msgpack.Decoder(_MapBlockStored | _MapBlockRemoved | _MapAllBlocksCleared)


def _hash_id(value: BlockHashOnWire) -> int:
    """A block hash as the router's opaque 64-bit id: ints as they are, digests as vLLM's integer
    mode converts them (big-endian, low 64 bits), so both modes name a block alike."""
    if isinstance(value, bytes):
        return int.from_bytes(value, "big") & _HASH_MASK
    return value


def _decode_event(raw: msgspec.Raw) -> KVEvent:
    data = memoryview(raw)  # the event's bytes inside the batch, not copied
    if not data or data[0] not in _MSGPACK_MAP_FIRST_BYTES:
        return _array_event_decoder.decode(data)
    event = _map_event_decoder.decode(data)
    if isinstance(event, _MapBlockStored):
        parent = event.parent_block_hash
        return BlockStored(
            block_hashes=[_hash_id(h) for h in event.block_hashes],
            parent_block_hash=None if parent is None else _hash_id(parent),
            token_ids=event.token_ids,
            block_size=event.block_size,
            lora_id=event.lora_id,
            medium=event.medium,
        )
    if isinstance(event, _MapBlockRemoved):
        return BlockRemoved(block_hashes=[_hash_id(h) for h in event.block_hashes], medium=event.medium)
    return AllBlocksCleared()
