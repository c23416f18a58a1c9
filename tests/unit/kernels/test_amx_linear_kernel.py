"""The AMX linear kernel against a float32 matmul of the same bf16 operands: row counts that cut
tiles short, odd numbers of 16-feature weight tiles, bias, strided rows of x, and Linear routing
decode batches to it. Skipped where the CPU has no AMX-BF16 (Linear then keeps oneDNN)."""

from __future__ import annotations

import pytest
import torch

from tandem.kernels import amx_linear
from tandem.models.layers.linear import Linear

pytestmark = pytest.mark.skipif(not amx_linear.available(), reason="no AMX-BF16 (or no C compiler) here")


def reference(x, weight, bias):
    y = x.float() @ weight.float().t()
    return (y + bias.float() if bias is not None else y).bfloat16()


@pytest.mark.parametrize("rows", [1, 3, 16, 17, 33, 64, 100])
@pytest.mark.parametrize("in_features,out_features", [(576, 960), (1536, 576), (64, 48), (96, 16)])
def test_kernel_matches_matmul(rows, in_features, out_features):
    g = torch.Generator().manual_seed(rows * 7 + in_features)
    weight = torch.randn(out_features, in_features, generator=g).bfloat16()
    bias = torch.randn(out_features, generator=g).bfloat16() if rows % 2 else None
    x = torch.randn(rows, in_features, generator=g).bfloat16()
    got = amx_linear.AmxLinear(weight, bias)(x)
    # bf16 operands, float32 accumulation in a different order, one bf16 rounding of the result.
    torch.testing.assert_close(got.float(), reference(x, weight, bias).float(), atol=2e-2 * in_features**0.5, rtol=1e-2)


def test_strided_rows_of_x():
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(64, 128, generator=g).bfloat16()
    wide = torch.randn(20, 256, generator=g).bfloat16()
    x = wide[:, 64:192]  # row stride 256
    torch.testing.assert_close(
        amx_linear.AmxLinear(weight, None)(x).float(), reference(x, weight, None).float(), atol=0.3, rtol=1e-2
    )


def test_shapes_outside_the_limits():
    assert not amx_linear.supports(torch.zeros(24, 64, dtype=torch.bfloat16))  # out not a multiple of 16
    assert not amx_linear.supports(torch.zeros(16, 40, dtype=torch.bfloat16))  # in not a multiple of 32
    assert not amx_linear.supports(torch.zeros(16, 64))  # float32


def test_linear_routes_decode_batches_to_the_kernel():
    layer = Linear(576, 960, bias=True)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(960, 576) * 0.05)
        layer.bias.copy_(torch.randn(960))
    layer.to(torch.bfloat16)
    layer.prepare_for_cpu()
    assert layer.amx is not None
    x = torch.randn(8, 576).bfloat16()
    calls = []
    original = layer.amx.__call__
    layer.amx = type("Spy", (), {"__call__": lambda self, t: calls.append(t.shape[0]) or original(t)})()
    out = layer(x)
    assert calls == [8]
    torch.testing.assert_close(out.float(), reference(x, layer.weight, layer.bias).float(), atol=0.5, rtol=1e-2)
