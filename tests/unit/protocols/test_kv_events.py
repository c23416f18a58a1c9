"""KV event decoding: Tandem's array shape, vLLM's map shape (golden bytes from vLLM 0.32), mixed
batches, byte digests as block hashes, and clear errors on malformed input."""

from __future__ import annotations

import msgspec
import pytest
from tests.vllm_samples import VLLM_032_BATCH

from tandem.protocols.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    decode_batch,
    encode_batch,
    make_batch,
)

DIGEST_AS_INT = int.from_bytes(b"\x01" * 32, "big") & ((1 << 64) - 1)


def test_array_shaped_batches_round_trip() -> None:
    batch = make_batch(
        [
            BlockStored(block_hashes=[1, 2], parent_block_hash=None, token_ids=list(range(32)), block_size=16),
            BlockRemoved(block_hashes=[2]),
            AllBlocksCleared(),
        ]
    )
    assert decode_batch(encode_batch(batch)) == batch


def test_vllm_map_shaped_batch_decodes_with_digests_as_64_bit_ids() -> None:
    batch = decode_batch(VLLM_032_BATCH)
    assert batch.ts == 1.5 and batch.data_parallel_rank is None
    stored, removed, cleared = batch.events
    assert stored == BlockStored(
        block_hashes=[DIGEST_AS_INT, 7],
        parent_block_hash=None,
        token_ids=list(range(32)),
        block_size=16,
        lora_id=None,
        medium="GPU",
    )
    assert removed == BlockRemoved(block_hashes=[DIGEST_AS_INT], medium="GPU")
    assert cleared == AllBlocksCleared()


def test_unknown_fields_are_ignored_and_array_and_map_events_mix() -> None:
    future_stored = {
        "type": "BlockStored",
        "block_hashes": [b"\xff" * 32],
        "parent_block_hash": 5,
        "token_ids": list(range(16)),
        "block_size": 16,
        "medium": "CPU",
        "kv_cache_spec_kind": "full_attention",
        "locality": "LOCAL",
        "some_field_from_2027": {"nested": [1, 2]},
    }
    old_removed = BlockRemoved(block_hashes=[9])
    payload = msgspec.msgpack.encode([2.0, [future_stored, old_removed], 3])
    batch = decode_batch(payload)
    assert batch.data_parallel_rank == 3
    assert batch.events == [
        BlockStored(
            block_hashes=[(1 << 64) - 1], parent_block_hash=5, token_ids=list(range(16)), block_size=16, medium="CPU"
        ),
        old_removed,
    ]


@pytest.mark.parametrize(
    "payload, message",
    [
        (VLLM_032_BATCH[:40], "truncated"),
        (msgspec.msgpack.encode([1.0, [{"type": "BlockEvicted", "block_hashes": []}], None]), "BlockEvicted"),
        (msgspec.msgpack.encode([1.0, [{"type": "BlockRemoved"}], None]), "block_hashes"),
        (msgspec.msgpack.encode([1.0, [{"type": "BlockRemoved", "block_hashes": ["x"]}], None]), "block_hashes"),
        (msgspec.msgpack.encode({"ts": 1.0}), "array"),
    ],
)
def test_malformed_batches_raise_decode_errors_that_say_what(payload: bytes, message: str) -> None:
    with pytest.raises(msgspec.DecodeError, match=message):
        decode_batch(payload)
