"""The block-hashing contract (DESIGN.md §4), shared by router, engines, KV events and kvbm.

Prompt tokens are cut into blocks of ``block_size`` tokens and only full blocks are hashed:

    local_hash[i] = xxh3_64(tokens of block i as little-endian uint32, seed)
    seq_hash[0]   = local_hash[0]
    seq_hash[i]   = xxh3_64(le_uint64(seq_hash[i-1]) || le_uint64(local_hash[i]), seed)

with ``seed = 1337``, which matches NVIDIA Dynamo's router. A per-request ``cache_salt`` gives
a different seed, so tenants with different salts never share blocks.

:func:`block_hashes` runs the per-block loop in C (``kernels/block_hash.c``, built on first use
and linked to the system's libxxhash) when it can, which is ~10× faster than two Python-level
xxh3 calls per block; otherwise, or with ``TANDEM_NATIVE_HASH=0``, it runs the same loop in
Python. Both give the same hashes (tests/unit/test_hashing.py checks them against each other).
"""

from __future__ import annotations

import array
import ctypes
import logging
import os
import struct
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import xxhash

from tandem.kernels.native import NativeUnavailable, load_library

logger = logging.getLogger(__name__)

BLOCK_HASH_SEED = 1337
DEFAULT_BLOCK_SIZE = 16

_U64_PAIR = struct.Struct("<QQ")
_U64_MASK = (1 << 64) - 1

_NATIVE_SOURCE = Path(__file__).parent / "kernels" / "block_hash.c"
_NATIVE_FLAGS = ["-O2", "-shared", "-fPIC", "-l:libxxhash.so.0"]
_native_fn: Callable[..., None] | None = None
_native_tried = False


def native_hashing() -> bool:
    """Whether :func:`block_hashes` runs in C (building the kernel on the first call)."""
    global _native_fn, _native_tried
    if not _native_tried:
        _native_tried = True
        usable = sys.byteorder == "little" and array.array("I").itemsize == 4 and array.array("Q").itemsize == 8
        if usable and os.environ.get("TANDEM_NATIVE_HASH", "1") != "0":
            signature = ([ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint64, ctypes.c_uint64,
                          ctypes.c_int32, ctypes.c_void_p], None)
            try:
                lib = load_library("tandem_block_hash", [_NATIVE_SOURCE], _NATIVE_FLAGS,
                                   {"tandem_block_hashes": signature})
                _native_fn = lib.tandem_block_hashes
            except NativeUnavailable as exc:
                logger.warning("native block hashing unavailable (%s); hashing in Python", exc)
    return _native_fn is not None


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


def _native_block_hashes(token_ids: Sequence[int], num_full: int, block_size: int, seed: int,
                         parent_hash: int | None) -> list[int]:
    # array.array converts a list ~3x faster than numpy and hands out its address without
    # numpy's per-call ctypes object: this call must stay cheap for 1-4-block KV events too.
    if isinstance(token_ids, np.ndarray):
        tokens = np.ascontiguousarray(token_ids[: num_full * block_size], dtype="<u4")
        tokens_address = tokens.ctypes.data
    else:
        tokens = array.array("I", token_ids[: num_full * block_size])  # OverflowError outside uint32
        tokens_address = tokens.buffer_info()[0]
    out = array.array("Q", bytes(8 * num_full))
    _native_fn(tokens_address, num_full, block_size, seed & _U64_MASK, (parent_hash or 0) & _U64_MASK,
               parent_hash is not None, out.buffer_info()[0])
    return out.tolist()


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
    if _native_fn is not None or (not _native_tried and native_hashing()):
        return _native_block_hashes(token_ids, num_full, block_size, seed, parent_hash)
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
