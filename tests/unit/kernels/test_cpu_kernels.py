"""The C decode kernel: builds, matches torch, and is used only where it pays."""

from __future__ import annotations

import pytest
import torch

from tandem.kernels import cpu_kernels
from tandem.models.layers.linear import GEMV_MAX_ROWS, Linear

pytestmark = pytest.mark.skipif(cpu_kernels.load() is None, reason="no C compiler on this machine")


@pytest.mark.parametrize("rows", [1, 2, 3])
@pytest.mark.parametrize("with_bias", [False, True])
def test_float32_matches_torch(rows, with_bias):
    torch.manual_seed(0)
    w, x = torch.randn(300, 130), torch.randn(rows, 130)  # odd sizes exercise the vector tails
    b = torch.randn(300) if with_bias else None
    torch.testing.assert_close(cpu_kernels.gemv(x, w, b), torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_bfloat16_weights_match_float32_math():
    torch.manual_seed(1)
    w, x = torch.randn(64, 96, dtype=torch.bfloat16), torch.randn(2, 96, dtype=torch.bfloat16)
    expected = torch.nn.functional.linear(x.float(), w.float())
    out = cpu_kernels.gemv(x, w, None)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2)


def test_linear_routes_small_batches_to_kernel_and_large_to_onednn():
    layer = Linear(32, 48)
    torch.nn.init.normal_(layer.weight)
    layer.prepare_for_cpu()
    assert layer.gemv is not None and layer.weight is not None
    calls = []
    real = layer.gemv
    layer.gemv = lambda x: calls.append(x.shape[0]) or real(x)
    for rows in (1, GEMV_MAX_ROWS, GEMV_MAX_ROWS + 1, 64):
        x = torch.randn(rows, 32)
        torch.testing.assert_close(layer(x), x @ layer.weight.t(), rtol=1e-4, atol=1e-4)
    assert calls == [1, GEMV_MAX_ROWS]
