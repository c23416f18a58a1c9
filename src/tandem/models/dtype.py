"""Choosing the weights and KV dtype: ``auto`` is bfloat16 where the hardware computes in it
natively, float32 elsewhere.

bfloat16 halves the bytes every decode step streams and, on CPUs with AVX512-BF16 or AMX,
runs the prefill GEMMs several times faster; on a CPU without them PyTorch emulates bfloat16
arithmetic and float32 is the faster choice. On CUDA, bfloat16 where the GPU supports it
(Ampere and later), else float16.
"""

from __future__ import annotations

import torch

from tandem.kernels.native import cpu_flags

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
"""/proc/cpuinfo flags, any of which makes ``auto`` pick bfloat16 on CPU."""


def cpu_has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    return any(flag in (cpu_flags() if flags is None else flags) for flag in CPU_BF16_FLAGS)


def resolve_dtype(dtype: str, device: str | torch.device) -> str:
    """``dtype`` itself, or for ``auto`` the dtype this device runs best (see module docstring)."""
    if dtype != "auto":
        return dtype
    dev = torch.device(device)
    if dev.type == "cuda":
        return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float16"
    return "bfloat16" if cpu_has_native_bf16() else "float32"
