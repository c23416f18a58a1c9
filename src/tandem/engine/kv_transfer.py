"""Export and import of KV blocks (block hashes + raw bytes), the unit of P/D transfer.

An export carries the contract hashes of a run of full prompt blocks, their tokens, and their
KV bytes (a run may start past block 0: ``parent_hash`` then names the block before it, so a
decode worker can pull and import only the blocks it lacks) laid out ``[num_blocks, layers, 2 (k, v), block_size, kv_heads, head_dim]``. Import
checks the hashes against the tokens (never trusting the sender), writes the bytes into fresh
blocks and publishes them to the prefix cache, so the request that follows simply hits them.
"""

from __future__ import annotations

import warnings

import msgspec
import torch

from tandem.hashing import block_hashes


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


def tensor_to_export(data: torch.Tensor, hashes: list[int], token_ids: list[int], block_size: int,
                     hash_seed: int) -> KVBlockExport:
    cpu = data.contiguous().cpu()
    raw = cpu.view(torch.uint8).numpy().tobytes()
    return KVBlockExport(block_size, str(cpu.dtype).removeprefix("torch."), list(cpu.shape[1:]), hash_seed,
                         hashes, token_ids, raw)


def verify_block_hashes(export: KVBlockExport) -> None:
    """Check that the export's tokens cover its blocks and hash to its block hashes."""
    if len(export.token_ids) != len(export.block_hashes) * export.block_size:
        raise ValueError("token_ids do not cover the exported blocks")
    if block_hashes(export.token_ids, export.block_size, export.hash_seed, export.parent_hash) != list(export.block_hashes):
        raise ValueError("block hashes do not match their tokens")


def export_to_tensor(export: KVBlockExport, expected_block_shape: list[int], expected_dtype: torch.dtype) -> torch.Tensor:
    """Validate an export against this engine's layout and return its blocks as a tensor."""
    dtype = getattr(torch, export.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown KV dtype {export.dtype!r}")
    if list(export.block_shape) != list(expected_block_shape):
        raise ValueError(f"KV block shape {export.block_shape} does not match this engine's {expected_block_shape}")
    verify_block_hashes(export)
    n = len(export.block_hashes)
    numel = n
    for dim in export.block_shape:
        numel *= dim
    element_size = torch.tensor([], dtype=dtype).element_size()
    if len(export.data) != numel * element_size:
        raise ValueError(f"KV payload is {len(export.data)} bytes, expected {numel * element_size}")
    if numel == 0:
        return torch.empty(n, *export.block_shape, dtype=expected_dtype)
    # A view of the payload, not a copy: the caller's write into the KV cache is the one copy.
    # torch warns that the buffer is read-only; nothing writes through this view.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        tensor = torch.frombuffer(export.data, dtype=dtype).view(n, *export.block_shape)
    return tensor.to(expected_dtype)
