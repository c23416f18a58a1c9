"""One KV block as one file: a fixed header, the block's tokens, then its bytes.

The header carries the layout fingerprint (model, dtype, block shape), the block's sequence
hash, its parent's hash and hash seed, and an xxh3-64 checksum of everything else in the file.
`decode_block` accepts a file only if its size, magic, version, layout and checksum are right
*and* the hash chain holds (the contract hash of parent + tokens is the block's hash): a
corrupt, truncated or foreign file is rejected (a miss, recomputed), never served.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import xxhash

from tandem.engine.kv_tiers.block_meta import BlockMeta
from tandem.kernels.block_hash import block_hashes

MAGIC = b"TANDKVG3"
FORMAT_VERSION = 1
SUFFIX = ".kvb"

# magic, version, block_size, fingerprint, block_hash, parent_hash, has_parent, hash_seed,
# frequency, payload_len, checksum
_HEADER = struct.Struct("<8sIIQQQBxxxQIQQ")
HEADER_BYTES = _HEADER.size
_CHECKSUM_AT = HEADER_BYTES - 8


class CorruptBlockError(ValueError):
    """A block file that must not be served."""


@dataclass(frozen=True)
class BlockHeader:
    block_size: int
    fingerprint: int
    meta: BlockMeta
    payload_len: int


def file_name(block_hash: int) -> str:
    return f"{block_hash:016x}{SUFFIX}"


def file_size(block_size: int, payload_len: int) -> int:
    return HEADER_BYTES + 4 * block_size + payload_len


def encode_block(meta: BlockMeta, block_size: int, fingerprint: int, payload: bytes) -> bytes:
    if len(meta.token_ids) != block_size:
        raise ValueError(f"a block holds {block_size} tokens, got {len(meta.token_ids)}")
    head = _HEADER.pack(
        MAGIC,
        FORMAT_VERSION,
        block_size,
        fingerprint,
        meta.block_hash,
        meta.parent_hash or 0,
        meta.parent_hash is not None,
        meta.hash_seed,
        min(meta.frequency, 2**32 - 1),
        len(payload),
        0,
    )
    tokens = struct.pack(f"<{block_size}I", *meta.token_ids)
    checksum = _checksum(head[:_CHECKSUM_AT], tokens, payload)
    return head[:_CHECKSUM_AT] + struct.pack("<Q", checksum) + tokens + payload


def decode_header(raw: bytes) -> BlockHeader:
    """The header alone (no checksum check: the scan at start reads only headers)."""
    if len(raw) < HEADER_BYTES:
        raise CorruptBlockError("truncated header")
    (magic, version, block_size, fingerprint, block_hash, parent, has_parent, seed, frequency, payload_len, _) = (
        _HEADER.unpack_from(raw)
    )
    if magic != MAGIC or version != FORMAT_VERSION:
        raise CorruptBlockError("not a Tandem KV block file of this format version")
    meta = BlockMeta(block_hash, parent if has_parent else None, seed, (), frequency)
    return BlockHeader(block_size, fingerprint, meta, payload_len)


def decode_block(raw: bytes, fingerprint: int, block_size: int, payload_len: int) -> tuple[BlockMeta, bytes]:
    """The block's metadata and bytes, or CorruptBlockError."""
    header = decode_header(raw)
    if header.fingerprint != fingerprint or header.block_size != block_size or header.payload_len != payload_len:
        raise CorruptBlockError("block of another model, dtype or block size")
    if len(raw) != file_size(block_size, payload_len):
        raise CorruptBlockError(f"file is {len(raw)} bytes, expected {file_size(block_size, payload_len)}")
    tokens_end = HEADER_BYTES + 4 * block_size
    tokens_raw, payload = raw[HEADER_BYTES:tokens_end], raw[tokens_end:]
    (stored_checksum,) = struct.unpack_from("<Q", raw, _CHECKSUM_AT)
    if _checksum(raw[:_CHECKSUM_AT], tokens_raw, payload) != stored_checksum:
        raise CorruptBlockError("checksum mismatch")
    meta = header.meta
    meta.token_ids = struct.unpack(f"<{block_size}I", tokens_raw)
    chained = block_hashes(list(meta.token_ids), block_size, meta.hash_seed, parent_hash=meta.parent_hash)
    if chained != [meta.block_hash]:
        raise CorruptBlockError("hash chain broken: parent + tokens do not hash to the block's hash")
    return meta, payload


def _checksum(head: bytes, tokens: bytes, payload: bytes) -> int:
    digest = xxhash.xxh3_64()
    digest.update(head)
    digest.update(tokens)
    digest.update(payload)
    return digest.intdigest()


def decode_meta(raw: bytes, block_size: int) -> BlockMeta:
    """Metadata and tokens from a file's first bytes (header + tokens; not checksummed)."""
    return decode_header_and_tokens(raw, block_size).meta


def decode_header_and_tokens(raw: bytes, block_size: int) -> BlockHeader:
    """The header with the block's tokens filled in (what a scan at start needs; not checksummed)."""
    header = decode_header(raw)
    end = HEADER_BYTES + 4 * block_size
    if len(raw) < end:
        raise CorruptBlockError("truncated token list")
    header.meta.token_ids = struct.unpack(f"<{block_size}I", raw[HEADER_BYTES:end])
    return header
