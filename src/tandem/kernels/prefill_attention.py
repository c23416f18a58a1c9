"""Tandem's AMX prefill-attention kernel for CPU (``prefill_attention.c``), wrapped for torch tensors.

Why our own kernel: PyTorch's CPU flash attention reaches ~0.3-0.5 TFLOP/s in bfloat16 on a
2-core AMX machine (a quarter of a 1,024-token prefill went there), and a chunk with a cached
prefix first had to gather that prefix slot by slot and build a mask. This kernel reads every
key and value in place through the block table and multiplies with AMX tiles
(benchmarks/cpu_kernel_choices.py measures it against SDPA). It needs AMX-BF16 (Intel Sapphire
Rapids and later) and a bfloat16 cache; elsewhere ``supports()`` is False and attention keeps
SDPA. ``TANDEM_DISABLE_CPU_PREFILL_ATTENTION=1`` forces that path.
"""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path

import torch

from tandem.kernels.native import LazyLibrary, Signatures

SOURCES = [Path(__file__).with_name("prefill_attention.c")]
HEADERS = [Path(__file__).with_name("amx_gemm.h")]
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-lm"]
MAX_HEAD_DIM = 256
_P, _I = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES: Signatures = {
    "tandem_prefill_attention_available": ([], ctypes.c_int),
    "tandem_prefill_attention_bf16": (
        [_P, _I, _P, _P, _P, _I, _P, _I, _P, _I, _I, _I, _I, _I, ctypes.c_float, ctypes.c_int],
        ctypes.c_int,
    ),
}
load = LazyLibrary(
    "tandem_prefill_attention",
    SOURCES,
    FLAGS,
    _SIGNATURES,
    HEADERS,
    disable_env="TANDEM_DISABLE_CPU_PREFILL_ATTENTION",
    fallback="prefill attention uses SDPA",
)
"""The compiled kernel library (built on first use), or None if that is impossible or disabled."""


@cache
def available() -> bool:
    """Whether the kernel runs here: built with AMX, and the OS grants this process AMX state."""
    lib = load()
    return lib is not None and lib.tandem_prefill_attention_available() == 1


def supports(k_cache: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    """Whether the kernel can serve this cache and shape (else the caller uses SDPA)."""
    return (
        k_cache.device.type == "cpu"
        and k_cache.dtype == torch.bfloat16
        and head_dim % 32 == 0
        and head_dim <= MAX_HEAD_DIM
        and num_heads % num_kv_heads == 0
        and available()
    )


def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    chunk_info: torch.Tensor,
    block_size: int,
    scale: float,
    out: torch.Tensor,
) -> None:
    """Causal attention of every prefill chunk of a step, written into ``out``.

    q and out ``[tokens, Hq, D]`` bf16 (rows may be strided: q is often a view of the fused QKV
    output); caches ``[slots, Hkv, D]`` bf16 holding every chunk's K/V (its own tokens included);
    ``block_tables`` int64 ``[chunks, max_blocks]``; ``chunk_info`` int64 ``[chunks, 3]`` = (first
    token of the chunk in q, its query count, its context length): the queries are the context's
    last positions."""
    lib = load()
    assert lib is not None
    num_heads, head_dim = q.shape[1], q.shape[2]
    assert q.stride(1) == head_dim and q.stride(2) == 1 and out.stride(1) == head_dim and out.stride(2) == 1
    assert block_tables.is_contiguous() and chunk_info.is_contiguous()
    status = lib.tandem_prefill_attention_bf16(
        q.data_ptr(),
        q.stride(0),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        block_tables.data_ptr(),
        block_tables.shape[1],
        chunk_info.data_ptr(),
        chunk_info.shape[0],
        out.data_ptr(),
        out.stride(0),
        num_heads,
        k_cache.shape[1],
        head_dim,
        block_size,
        scale,
        torch.get_num_threads(),
    )
    if status != 0:
        raise ValueError(f"C prefill-attention kernel failed (status {status})")
