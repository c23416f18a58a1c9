"""Loads Tandem's C kernels for CPU decode and wraps them for torch tensors.

Why our own kernel: ``gemv.c`` — at 1-2 activation rows a decode step streams every weight
once; on this project's 2-core machine MKL reaches ~10 GB/s there, packed oneDNN ~15-20 GB/s,
this plain loop ~24-26 GB/s (``benchmarks/cpu_linear_paths.py``, docs/benchmarks.md). (A paged
decode attention kernel in the same style measured no faster than gather + SDPA here, so it is
not kept.) The library is compiled on first use with the system C compiler
(``cc -O3 -march=native -fopenmp``) into the Tandem cache, keyed by the source and the CPU, and
called through ctypes on tensors' raw pointers. Torch must be imported
first so the kernel shares torch's OpenMP runtime (same libgomp soname). Without a compiler,
``load()`` returns None and callers fall back to oneDNN.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from tandem.kernels.native import LazyLibrary

SOURCES = [Path(__file__).with_name("gemv.c")]
HEADERS = [Path(__file__).with_name("dot.h")]
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
_GEMV_ARGS = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
_SIGNATURES = {"tandem_gemv_f32": _GEMV_ARGS, "tandem_gemv_bf16": _GEMV_ARGS}
load = LazyLibrary(
    "tandem_cpu",
    SOURCES,
    FLAGS + ["-lm"],
    {name: (argtypes, None) for name, argtypes in _SIGNATURES.items()},
    HEADERS,
    disable_env="TANDEM_DISABLE_CPU_GEMV",
    fallback="falling back to oneDNN",
)
"""The compiled kernel library (built on first use), or None if that is impossible."""


def supports(weight: torch.Tensor) -> bool:
    return weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16) and weight.is_contiguous()


class Gemv:
    """``x @ weight.T + bias`` for a few rows of x through the C kernel, bound to one weight.

    Everything that does not depend on x (function, pointers, sizes, a float32 bias) is resolved
    once here, since decode calls this ~120 times per token.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        lib = load()
        assert lib is not None and supports(weight), "the C kernel is unavailable for this weight"
        self.weight = weight  # holds the memory the pointer refers to
        self.bias32 = bias.detach().float().contiguous() if bias is not None else None
        self._fn = lib.tandem_gemv_f32 if weight.dtype == torch.float32 else lib.tandem_gemv_bf16
        self._weight_ptr = weight.data_ptr()
        self._bias_ptr = self.bias32.data_ptr() if self.bias32 is not None else None
        self.out_features, self.in_features = weight.shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x if x.dtype == torch.float32 and x.is_contiguous() else x.float().contiguous()
        out = torch.empty(x32.shape[0], self.out_features, dtype=torch.float32)
        self._fn(
            x32.data_ptr(),
            self._weight_ptr,
            self._bias_ptr,
            out.data_ptr(),
            x32.shape[0],
            self.out_features,
            self.in_features,
            torch.get_num_threads(),
        )
        return out if x.dtype == torch.float32 else out.to(x.dtype)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """One-off ``x @ weight.T + bias`` through the C kernel (see Gemv for repeated use)."""
    return Gemv(weight, bias)(x)
