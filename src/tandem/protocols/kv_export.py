"""The unit of P/D KV transfer: a run of full prompt blocks with their hashes, tokens and bytes.

An export carries the contract hashes of a run of full prompt blocks, their tokens, and their
KV bytes laid out ``[num_blocks, layers, 2 (k, v), block_size, kv_heads, head_dim]``. A run may
start past block 0: ``parent_hash`` then names the block before it, so a decode worker can pull
only the blocks it lacks. An importer never trusts the sender: :func:`verify_block_hashes`.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from tandem.protocols.block_hash import block_hashes

BlockHasher = Callable[[list[int], int, int, int | None], list[int]]


class KVBlockExport(msgspec.Struct):
    block_size: int
    dtype: str
    """torch dtype name of the bytes, e.g. 'float32'."""
    block_shape: list[int]
    """[layers, 2, block_size, kv_heads, head_dim] of one block."""
    hash_seed: int
    block_hashes: list[int]
    token_ids: list[int]
    """All tokens of the exported blocks, concatenated."""
    data: bytes
    """The KV bytes; an importer also accepts any buffer (e.g. a pulled payload's memoryview)."""
    parent_hash: int | None = None
    """Sequence hash of the block before the first exported one; None when the run starts at block 0."""


def verify_block_hashes(export: KVBlockExport, hasher: BlockHasher = block_hashes) -> None:
    """Check that the export's tokens cover its blocks and hash to its block hashes.

    ``hasher``: an implementation of the contract's ``block_hashes`` (the C one in ``tandem.kernels``)."""
    if len(export.token_ids) != len(export.block_hashes) * export.block_size:
        raise ValueError("token_ids do not cover the exported blocks")
    if hasher(export.token_ids, export.block_size, export.hash_seed, export.parent_hash) != list(export.block_hashes):
        raise ValueError("block hashes do not match their tokens")
