"""Tandem's AMX linear kernel for CPU (``amx_linear.c``): ``x @ weight.T + bias`` in bfloat16
for decode batch sizes, reading the weight in its plain ``[out, in]`` layout.

Why our own kernel: at 8-128 rows oneDNN's packed AMX matmul reached about half of what
streaming the weights once allows on a 2-core Sapphire Rapids (``benchmarks/cpu_linear_paths.py``
measures both, figures in docs/benchmarks.md). Needs AMX-BF16; elsewhere ``available()`` is
False and Linear keeps oneDNN. ``TANDEM_DISABLE_CPU_AMX_LINEAR=1`` forces that.
"""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path

import torch

from tandem.kernels.native import LazyLibrary, Signatures

SOURCES = [Path(__file__).with_name("amx_linear.c")]
HEADERS = [Path(__file__).with_name("amx_gemm.h")]
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
_P, _I = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES: Signatures = {
    "tandem_amx_linear_available": ([], ctypes.c_int),
    "tandem_amx_linear_bf16": ([_P, _I, _I, _I, _P, _I, _P, _P, _I, ctypes.c_int], ctypes.c_int),
}
load = LazyLibrary(
    "tandem_amx_linear",
    SOURCES,
    FLAGS,
    _SIGNATURES,
    HEADERS,
    disable_env="TANDEM_DISABLE_CPU_AMX_LINEAR",
    fallback="decode batches use oneDNN",
)
"""The compiled kernel library (built on first use), or None if that is impossible or disabled."""


@cache
def available() -> bool:
    """Whether the kernel runs here: built with AMX, and the OS grants this process AMX state."""
    lib = load()
    return lib is not None and lib.tandem_amx_linear_available() == 1


def supports(weight: torch.Tensor) -> bool:
    out_features, in_features = weight.shape
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and weight.is_contiguous()
        and in_features % 32 == 0
        and out_features % 16 == 0
        and available()
    )


class AmxLinear:
    """``x @ weight.T + bias`` (bfloat16) through the AMX kernel, bound to one weight."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        assert supports(weight), "the AMX kernel is unavailable for this weight"
        lib = load()
        assert lib is not None
        self.weight = weight  # holds the memory the pointer refers to
        self.bias32 = bias.detach().float().contiguous() if bias is not None else None
        self._fn = lib.tandem_amx_linear_bf16
        self._weight_ptr = weight.data_ptr()
        self._bias_ptr = self.bias32.data_ptr() if self.bias32 is not None else None
        self.out_features, self.in_features = weight.shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.bfloat16 or x.stride(-1) != 1:
            x = x.to(torch.bfloat16).contiguous()
        out = torch.empty(x.shape[0], self.out_features, dtype=torch.bfloat16)
        status = self._fn(
            x.data_ptr(),
            x.stride(0),
            x.shape[0],
            self.in_features,
            self._weight_ptr,
            self.out_features,
            self._bias_ptr,
            out.data_ptr(),
            self.out_features,
            torch.get_num_threads(),
        )
        if status != 0:
            raise RuntimeError(f"AMX linear kernel failed (status {status})")
        return out
