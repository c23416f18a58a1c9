"""The fused C elementwise kernels against the PyTorch ops they replace (models/llama.py's
unfused path), float32 and bfloat16, with ragged sizes that exercise the masked vector tails."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tandem.kernels import elementwise
from tandem.models.layers.rope import apply_rotary

pytestmark = pytest.mark.skipif(elementwise.load() is None, reason="no C compiler for the kernels")
DTYPES = [torch.float32, torch.bfloat16]


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    tol = 1e-5 if dtype == torch.float32 else 1.6e-2  # bf16: one rounding step apart at most
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [64, 576, 77])
def test_rmsnorm(dtype, n):
    x = torch.randn(5, n).to(dtype)
    w = (torch.rand(n) + 0.5).to(dtype)
    want = w * F.rms_norm(x.float(), (n,), eps=1e-5).to(dtype)
    close(elementwise.rmsnorm(x, w, 1e-5), want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [128, 1536, 40])
def test_silu_mul(dtype, inter):
    gu = (torch.randn(6, 2 * inter) * 4).to(dtype)
    gate, up = gu.split(inter, dim=-1)
    close(elementwise.silu_mul(gu), F.silu(gate) * up, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(9, 3, 64), (4, 2, 40), (2, 1, 128)])
def test_rope_store(dtype, num_heads, num_kv_heads, head_dim):
    tokens, num_slots = 7, 32
    qkv = torch.randn(tokens, (num_heads + 2 * num_kv_heads) * head_dim).to(dtype)
    angles = torch.rand(tokens, head_dim // 2) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    slots = torch.randperm(num_slots)[:tokens]
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    q, k, v = (t.reshape(tokens, -1, head_dim) for t in qkv.float().split([q_size, kv_size, kv_size], dim=-1))
    want_q, want_k = apply_rotary(q, k, cos.unsqueeze(1), sin.unsqueeze(1))
    k_cache = torch.zeros(num_slots, num_kv_heads, head_dim, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    elementwise.rope_store(qkv, cos, sin, slots, k_cache, v_cache, num_heads, num_kv_heads, head_dim)
    got_q = qkv[:, :q_size].reshape(tokens, num_heads, head_dim)
    close(got_q, want_q, dtype)
    close(qkv[:, q_size : q_size + kv_size].reshape(tokens, num_kv_heads, head_dim), want_k, dtype)
    close(k_cache[slots], want_k, dtype)
    close(v_cache[slots], v, dtype)
    untouched = torch.ones(num_slots, dtype=torch.bool)
    untouched[slots] = False
    assert k_cache[untouched].abs().sum() == 0 and v_cache[untouched].abs().sum() == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n", [(64, 49152), (3, 17), (5, 15), (1, 1000)])
def test_argmax_rows_matches_torch_first_index_on_ties(dtype, rows, n):
    x = torch.randn(rows, n).to(dtype)
    x[0, n // 3] = x[0].max() + 1
    x[0, n - 1] = x[0, n // 3]  # a tie: the first index wins, as torch.argmax
    assert torch.equal(elementwise.argmax_rows(x), torch.argmax(x, dim=1))
