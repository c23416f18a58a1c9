"""A linear layer that picks the fastest CPU path for the number of rows it multiplies.

HF checkpoints store weights ``[out, in]``; ``F.linear`` on CPU hands them to MKL, whose sgemm is
slow at the small row counts decoding uses. oneDNN with the weight reordered once into its
blocked layout (the same ops PyTorch's inductor uses when it freezes a CPU model) was ~2-4x
faster at 1-64 rows on this project's 2-core AVX-512 machine, and Tandem's own bandwidth-bound
kernel (``tandem.kernels.cpu_kernels``) on the plain weight beats oneDNN at 1-2 rows
(single-stream decode). On a CPU with AMX and bfloat16 weights, Tandem's AMX kernel
(``tandem.kernels.amx_linear``, on the plain weight too) beats oneDNN at small decode batches.
``benchmarks/cpu_linear_paths.py`` measures the paths, figures in docs/benchmarks.md. So on CPU a
layer keeps both the plain and the packed weight: two copies buy the faster decode. On CUDA the
plain ``F.linear`` (cuBLAS) is used.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from tandem.kernels import amx_linear, cpu_kernels

PACK_BATCH_HINT = 64
"""Row count oneDNN tunes the packed layout for (correct for any row count)."""
GEMV_MAX_ROWS = 2
"""Up to this many rows the C kernel beats oneDNN (benchmarks/cpu_linear_paths.py: 1.3x at 1 row, 1.5x at 2, even at 4)."""
AMX_MAX_ROWS = 32
"""From GEMV_MAX_ROWS + 1 up to this many rows the AMX kernel serves bfloat16 layers where the CPU
has AMX (measured on a 2-core Sapphire Rapids, 30 layers of SmolLM2-135M weights read from memory: 1.3-1.46x
oneDNN at 3-32 rows, a tie at 48-64)."""


_mkldnn_is_available: Callable[[], bool] = torch.backends.mkldnn.is_available
"""torch.backends.mkldnn.is_available, typed (torch leaves it unannotated)."""


def onednn_available() -> bool:
    return _mkldnn_is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight: torch.Tensor | None = nn.Parameter(torch.empty(out_features, in_features))
        """The plain [out, in] weight (a Parameter); None on CPU once only the packed copy is needed."""
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.packed_weight: torch.Tensor | None = None
        """oneDNN-layout copy used for more than GEMV_MAX_ROWS rows (opaque; CPU only)."""
        self.gemv: cpu_kernels.Gemv | None = None
        """The C kernel bound to ``weight``, used for up to GEMV_MAX_ROWS rows (CPU only)."""
        self.amx: amx_linear.AmxLinear | None = None
        """The AMX kernel bound to ``weight``, used for GEMV_MAX_ROWS < rows <= AMX_MAX_ROWS (CPU, bf16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if self.gemv is not None and rows <= GEMV_MAX_ROWS:
            return self.gemv(x)
        if self.amx is not None and rows <= AMX_MAX_ROWS:
            return self.amx(x)
        if self.packed_weight is not None:
            out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")
            return out
        assert self.weight is not None  # dropped only when packed_weight is set
        return F.linear(x, self.weight, self.bias)

    if TYPE_CHECKING:
        __call__ = forward

    def prepare_for_cpu(self) -> None:
        """Add a oneDNN-packed copy of the weight, and route small batches to the C kernels."""
        assert self.weight is not None  # prepared once, before any weight is dropped
        weight = self.weight.detach()
        if onednn_available():
            self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_BATCH_HINT)
        if cpu_kernels.load() is not None and cpu_kernels.supports(weight):
            self.gemv = cpu_kernels.Gemv(weight, self.bias)
        if amx_linear.supports(weight):
            self.amx = amx_linear.AmxLinear(weight, self.bias)
        if self.gemv is None and self.amx is None and self.packed_weight is not None:
            self.weight = None  # only the packed copy is needed

    @property
    def weight_bytes(self) -> int:
        """Bytes of one copy of the weight (what one multiplication reads)."""
        return self.in_features * self.out_features * _element_size(self.packed_weight, self.weight)


def _element_size(*tensors: torch.Tensor | None) -> int:
    return next(t.element_size() for t in tensors if t is not None)
