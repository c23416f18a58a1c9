"""A linear layer that, on CPU, multiplies with a weight prepacked for oneDNN.

HF checkpoints store weights ``[out, in]``; ``F.linear`` on CPU hands them to MKL, whose sgemm is
slow at the small row counts decoding uses. oneDNN with the weight reordered once into its
blocked layout (the same ops PyTorch's inductor uses when it freezes a CPU model) was 1.2-3x
faster on this project's 2-core AVX-512 machine across 1-512 rows, in float32 and bfloat16
(see docs/benchmarks.md). On CUDA the plain ``F.linear`` (cuBLAS) is kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PACK_BATCH_HINT = 64
"""Row count oneDNN tunes the packed layout for (correct for any row count)."""


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.packed_weight: torch.Tensor | None = None
        """oneDNN-layout copy used instead of ``weight`` once packed (opaque; CPU only)."""
        self.packed_bytes = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed_weight is None:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def pack_for_cpu(self) -> None:
        """Replace the weight by a oneDNN-packed copy (frees the original unless it is shared)."""
        weight = self.weight.detach()
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_BATCH_HINT)
        self.packed_bytes = weight.numel() * weight.element_size()
        self.weight = None


def should_pack(device: torch.device) -> bool:
    return device.type == "cpu" and onednn_available()
