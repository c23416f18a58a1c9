"""Fused elementwise kernels for CPU steps of many tokens (``elementwise.c``): RMSNorm, SiLU-and-
multiply, and RoPE with the KV-cache store, each one pass over the step's tokens.

Why our own kernels: in a 2,048-token bfloat16 prefill step PyTorch spent ~40% of the step in
these small ops (each a separate pass with dtype casts; figures in docs/benchmarks.md). Compiled
on first use like the other kernels; ``load()`` returns None without a compiler (the model then
keeps its PyTorch ops), and ``TANDEM_DISABLE_CPU_ELEMENTWISE=1`` forces that.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from tandem.kernels.native import LazyLibrary, Signatures

SOURCES = [Path(__file__).with_name("elementwise.c")]
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-lm"]
MAX_NORM_DIM = 16384
_P, _I, _F, _B = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
_SIGNATURES: Signatures = {
    "tandem_rmsnorm": ([_P, _P, _P, _I, _I, _F, _B, _B], None),
    "tandem_silu_mul": ([_P, _P, _I, _I, _B, _B], None),
    "tandem_rope_store": ([_P, _P, _P, _P, _P, _P, _I, _I, _I, _I, _B, _B], None),
    "tandem_argmax_rows": ([_P, _I, _I, _B, _P, _B], None),
}
load = LazyLibrary(
    "tandem_elementwise",
    SOURCES,
    FLAGS,
    _SIGNATURES,
    [Path(__file__).with_name(name) for name in ("avx512_math.h", "dot.h")],
    disable_env="TANDEM_DISABLE_CPU_ELEMENTWISE",
    fallback="using PyTorch ops",
)
"""The compiled kernel library (built on first use), or None if that is impossible or disabled."""


def supports(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype in (torch.float32, torch.bfloat16) and load() is not None


def _bf16(t: torch.Tensor) -> int:
    return int(t.dtype == torch.bfloat16)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's RMSNorm of x [T, n] (float32 math, rounded to x's dtype before the weight)."""
    x = x.contiguous()
    out = torch.empty_like(x)
    lib = load()
    assert lib is not None, "callers check supports() first"
    lib.tandem_rmsnorm(
        x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], eps, _bf16(x), torch.get_num_threads()
    )
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of a fused [T, 2I] gate/up projection, as [T, I]."""
    gate_up = gate_up.contiguous()
    rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(rows, inter, dtype=gate_up.dtype)
    lib = load()
    assert lib is not None, "callers check supports() first"
    lib.tandem_silu_mul(gate_up.data_ptr(), out.data_ptr(), rows, inter, _bf16(gate_up), torch.get_num_threads())
    return out


def rope_store(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    slots: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> None:
    """Rotate the q and k heads of ``qkv`` [T, (Hq + 2 Hkv) D] in place (cos/sin float32 [T, D]) and
    store each token's k and v in the caches [slots, Hkv, D] at ``slots`` [T]."""
    assert qkv.is_contiguous() and cos.dtype == torch.float32 and k_cache.dtype == qkv.dtype
    lib = load()
    assert lib is not None, "callers check supports() first"
    lib.tandem_rope_store(
        qkv.data_ptr(),
        cos.data_ptr(),
        sin.data_ptr(),
        slots.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        qkv.shape[0],
        num_heads,
        num_kv_heads,
        head_dim,
        _bf16(qkv),
        torch.get_num_threads(),
    )


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """Index of each row's largest value (the first on ties), int64 ``[rows]``; x float32 or
    bfloat16 ``[rows, n]`` on CPU, contiguous."""
    assert x.dim() == 2 and x.is_contiguous() and supports(x)
    out = torch.empty(x.shape[0], dtype=torch.int64)
    lib = load()
    assert lib is not None, "callers check supports() first"
    lib.tandem_argmax_rows(x.data_ptr(), x.shape[0], x.shape[1], _bf16(x), out.data_ptr(), torch.get_num_threads())
    return out
