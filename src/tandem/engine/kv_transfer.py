"""KV block exports (``tandem.protocols.kv_export``) to and from this engine's tensors.

Import checks the hashes against the tokens (never trusting the sender), and the engine then
writes the bytes into fresh blocks and publishes them to the prefix cache, so the request that
follows simply hits them.
"""

from __future__ import annotations

import warnings

import torch

from tandem.kernels.block_hash import block_hashes
from tandem.protocols.kv_export import KVBlockExport, verify_block_hashes


def tensor_to_export(
    data: torch.Tensor, hashes: list[int], token_ids: list[int], block_size: int, hash_seed: int
) -> KVBlockExport:
    cpu = data.contiguous().cpu()
    raw = cpu.view(torch.uint8).numpy().tobytes()
    return KVBlockExport(
        block_size, str(cpu.dtype).removeprefix("torch."), list(cpu.shape[1:]), hash_seed, hashes, token_ids, raw
    )


def export_to_tensor(
    export: KVBlockExport, expected_block_shape: list[int], expected_dtype: torch.dtype
) -> torch.Tensor:
    """Validate an export against this engine's layout and return its blocks as a tensor."""
    dtype = getattr(torch, export.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown KV dtype {export.dtype!r}")
    if list(export.block_shape) != list(expected_block_shape):
        raise ValueError(f"KV block shape {export.block_shape} does not match this engine's {expected_block_shape}")
    verify_block_hashes(export, block_hashes)
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
