"""Tandem's C paged-attention kernel for CPU (``paged_attention.c``), wrapped for torch tensors.

Why our own kernel: PyTorch has no paged attention for CPU. Without it, every decode row's
context is first gathered block by block into a padded batch for SDPA, which copies the whole
context of every sequence in every layer (~5 ms per layer at batch 64 on a 2-core machine).
This kernel reads K/V in place through the block table (docs/benchmarks.md has the figures).
Compiled on first use like the GEMV kernel (``tandem.kernels.native``); without a compiler
``load()`` returns None and attention keeps the gather + SDPA path. Set
``TANDEM_DISABLE_CPU_ATTENTION=1`` to force that path.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from tandem.kernels.native import LazyLibrary, Signatures

SOURCES = [Path(__file__).with_name("paged_attention.c"), Path(__file__).with_name("decode_forward.c")]
"""One library: the fused decode forward (tandem.kernels.decode_forward) calls the attention items."""
HEADERS = [Path(__file__).with_name(name) for name in ("paged_attention.h", "dot.h", "avx512_math.h", "amx_gemm.h")]
FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffast-math", "-shared", "-fPIC", "-lm"]
MAX_GROUP, MAX_HEAD_DIM, MAX_BLOCK = 32, 256, 64
"""Shape limits of the C kernel (query heads per KV head, head size, tokens per block)."""
_ARGS = (
    [ctypes.c_void_p] * 4
    + [ctypes.c_int64]
    + [ctypes.c_void_p] * 3
    + [ctypes.c_int64] * 5
    + [ctypes.c_float, ctypes.c_int]
)
_SIGNATURES: Signatures = {
    "tandem_paged_attention_f32": (_ARGS, ctypes.c_int),
    "tandem_paged_attention_bf16": (_ARGS, ctypes.c_int),
    "tandem_paged_attention_bf16_path": ([ctypes.c_int64], ctypes.c_int),
}
load = LazyLibrary(
    "tandem_attention",
    SOURCES,
    FLAGS,
    _SIGNATURES,
    HEADERS,
    disable_env="TANDEM_DISABLE_CPU_ATTENTION",
    fallback="using gather + SDPA",
)
"""The compiled kernel library (built on first use), or None if that is impossible or disabled."""


def bf16_path(head_dim: int) -> str:
    """The inner loop the kernel uses for bfloat16 caches of this head size (for tests and logs)."""
    lib = load()
    assert lib is not None
    return ("portable", "avx512-widen", "avx512-bf16-dot")[lib.tandem_paged_attention_bf16_path(head_dim)]


def supports(k_cache: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int) -> bool:
    """Whether the kernel can serve this cache and shape (else the caller uses gather + SDPA)."""
    return (
        k_cache.device.type == "cpu"
        and k_cache.dtype in (torch.float32, torch.bfloat16)
        and num_heads % num_kv_heads == 0
        and num_heads // num_kv_heads <= MAX_GROUP
        and head_dim <= MAX_HEAD_DIM
        and block_size <= MAX_BLOCK
        and load() is not None
    )


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    row_table: torch.Tensor,
    ctx_lens: torch.Tensor,
    block_size: int,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of q ``[rows, Hq, D]`` over the paged caches ``[slots, Hkv, D]``.

    Row r attends to the first ``ctx_lens[r]`` tokens of the sequence whose block table is
    ``block_tables[row_table[r]]`` (``block_tables`` int64 ``[sequences, max_blocks]``).
    Returns ``[rows, Hq, D]`` in q's dtype (written into ``out`` when given, float32 then)."""
    lib = load()
    assert lib is not None, "the C paged-attention kernel is unavailable"
    rows, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    q32 = q if q.dtype == torch.float32 and q.is_contiguous() else q.float().contiguous()
    result = out if out is not None else torch.empty(rows, num_heads, head_dim, dtype=torch.float32)
    fn = lib.tandem_paged_attention_f32 if k_cache.dtype == torch.float32 else lib.tandem_paged_attention_bf16
    status = fn(
        q32.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        block_tables.data_ptr(),
        block_tables.shape[1],
        row_table.data_ptr(),
        ctx_lens.data_ptr(),
        result.data_ptr(),
        rows,
        num_heads,
        num_kv_heads,
        head_dim,
        block_size,
        scale,
        torch.get_num_threads(),
    )
    if status != 0:
        raise ValueError("shape outside the C paged-attention kernel's limits")
    return result if q.dtype == torch.float32 or out is not None else result.to(q.dtype)
