"""KV cache events in vLLM's wire format.

An engine reports what its block pool stores and evicts so a KV-aware router can index it.
The structs mirror vLLM's ``EventBatch``/``BlockStored``/``BlockRemoved``/``AllBlocksCleared``
(msgspec, array-like, tagged union) so the router can index Tandem and vLLM workers alike.
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
    """Decode a msgpack EventBatch; raises msgspec.DecodeError on malformed input (never unpickles)."""
    return _decoder.decode(payload)
