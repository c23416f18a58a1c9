"""The block-hashing contract (``tandem.protocols.block_hash``) with its per-block loop in C.

``kernels/block_hash.c`` is built on first use and linked to the system's libxxhash; it is ~10×
faster than two Python-level xxh3 calls per block, which matters on the router's and the KV
event plane's hot paths. Without a compiler or libxxhash, or with ``TANDEM_NATIVE_HASH=0``,
:func:`block_hashes` is the Python reference. Both give the same hashes
(tests/unit/protocols/test_block_hash.py checks them against each other).
"""

from __future__ import annotations

import array
import ctypes
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from tandem.kernels.native import NativeUnavailable, load_library
from tandem.protocols import block_hash as reference
from tandem.protocols.block_hash import BLOCK_HASH_SEED, DEFAULT_BLOCK_SIZE

logger = logging.getLogger(__name__)

_U64_MASK = (1 << 64) - 1
_NATIVE_SOURCE = Path(__file__).with_name("block_hash.c")
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
            signature = (
                [
                    ctypes.c_void_p,
                    ctypes.c_int64,
                    ctypes.c_int64,
                    ctypes.c_uint64,
                    ctypes.c_uint64,
                    ctypes.c_int32,
                    ctypes.c_void_p,
                ],
                None,
            )
            try:
                lib = load_library(
                    "tandem_block_hash", [_NATIVE_SOURCE], _NATIVE_FLAGS, {"tandem_block_hashes": signature}
                )
                _native_fn = lib.tandem_block_hashes
            except NativeUnavailable as exc:
                logger.warning("native block hashing unavailable (%s); hashing in Python", exc)
    return _native_fn is not None


def _native_block_hashes(
    token_ids: Sequence[int], num_full: int, block_size: int, seed: int, parent_hash: int | None
) -> list[int]:
    assert _native_fn is not None
    # array.array converts a list ~3x faster than numpy and hands out its address without
    # numpy's per-call ctypes object: this call must stay cheap for 1-4-block KV events too.
    if isinstance(token_ids, np.ndarray):
        tokens = np.ascontiguousarray(token_ids[: num_full * block_size], dtype="<u4")
        tokens_address = tokens.ctypes.data
    else:
        tokens_array = array.array("I", token_ids[: num_full * block_size])  # OverflowError outside uint32
        tokens_address = tokens_array.buffer_info()[0]
    out = array.array("Q", bytes(8 * num_full))
    _native_fn(
        tokens_address,
        num_full,
        block_size,
        seed & _U64_MASK,
        (parent_hash or 0) & _U64_MASK,
        parent_hash is not None,
        out.buffer_info()[0],
    )
    return out.tolist()


def block_hashes(
    token_ids: Sequence[int],
    block_size: int = DEFAULT_BLOCK_SIZE,
    seed: int = BLOCK_HASH_SEED,
    parent_hash: int | None = None,
) -> list[int]:
    """Same as ``tandem.protocols.block_hash.block_hashes``, in C where it can."""
    num_full = len(token_ids) // block_size
    if num_full and (_native_fn is not None or (not _native_tried and native_hashing())):
        return _native_block_hashes(token_ids, num_full, block_size, seed, parent_hash)
    return reference.block_hashes(token_ids, block_size, seed, parent_hash)
