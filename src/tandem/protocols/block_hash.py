"""The block-hashing contract, shared by router, engines, KV events and KV cache tiers.

Prompt tokens are cut into blocks of ``block_size`` tokens and only full blocks are hashed:

    local_hash[i] = xxh3_64(tokens of block i as little-endian uint32, seed)
    seq_hash[0]   = local_hash[0]
    seq_hash[i]   = xxh3_64(le_uint64(seq_hash[i-1]) || le_uint64(local_hash[i]), seed)

with ``seed = 1337``, which matches NVIDIA Dynamo's router. A per-request ``cache_salt`` gives
a different seed, so tenants with different salts never share blocks.

This module is the reference implementation, in Python. ``tandem.kernels.block_hash`` runs the
same loop in C (~10× faster) and is what the engine, router and transfer plane call; the tests
check the two against each other.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np
import xxhash

BLOCK_HASH_SEED = 1337
DEFAULT_BLOCK_SIZE = 16

_U64_PAIR = struct.Struct("<QQ")
_U64_MASK = (1 << 64) - 1


def seed_for_salt(cache_salt: str | None) -> int:
    """The hashing seed for a request: 1337, or a salt-derived seed when ``cache_salt`` is set."""
    if not cache_salt:
        return BLOCK_HASH_SEED
    return xxhash.xxh3_64_intdigest(cache_salt.encode("utf-8"), seed=BLOCK_HASH_SEED)


def local_block_hash(tokens: Sequence[int], seed: int = BLOCK_HASH_SEED) -> int:
    """xxh3_64 of one block's token ids as little-endian uint32 bytes."""
    data = np.asarray(tokens, dtype="<u4").tobytes()
    return xxhash.xxh3_64_intdigest(data, seed=seed)


def chain_block_hash(parent_hash: int | None, local_hash: int, seed: int = BLOCK_HASH_SEED) -> int:
    """The sequence hash of a block given its parent's sequence hash (None for the first block)."""
    if parent_hash is None:
        return local_hash
    return xxhash.xxh3_64_intdigest(_U64_PAIR.pack(parent_hash, local_hash), seed=seed)


def block_hashes(
    token_ids: Sequence[int],
    block_size: int = DEFAULT_BLOCK_SIZE,
    seed: int = BLOCK_HASH_SEED,
    parent_hash: int | None = None,
) -> list[int]:
    """Sequence hashes of every full block of ``token_ids`` (a trailing partial block is skipped).

    ``parent_hash`` continues a chain: pass the last known sequence hash to hash only new blocks.
    """
    hashes: list[int] = []
    num_full = len(token_ids) // block_size
    if num_full == 0:
        return hashes
    # Convert all full blocks to little-endian uint32 bytes once, then hash byte slices: the
    # same bytes local_block_hash would build per block, at half the cost per block.
    data = np.asarray(token_ids[: num_full * block_size], dtype="<u4").tobytes()
    step = block_size * 4
    xxh3, pack = xxhash.xxh3_64_intdigest, _U64_PAIR.pack
    for i in range(num_full):
        local = xxh3(data[i * step : (i + 1) * step], seed=seed)
        parent_hash = local if parent_hash is None else xxh3(pack(parent_hash, local), seed=seed)
        hashes.append(parent_hash)
    return hashes
