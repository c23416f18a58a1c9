"""The C paged-attention kernel against gather + SDPA on the same paged cache: every GQA group
size, head sizes that take each inner path (AVX-512 float32, bfloat16 dot, bfloat16 widen,
portable), block sizes, ragged context lengths, rows sharing one block table (prefill-style),
and the engine's decode path with the kernel on and off."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tandem.kernels import paged_attention as cpu_paged
from tandem.models.layers.attention import AttentionMetadata, paged_attention

pytestmark = pytest.mark.skipif(cpu_paged.load() is None, reason="no C compiler for the kernel")


def reference(q, k_cache, v_cache, tables, row_table, ctx_lens, block_size, scale):
    """Per row: gather its context slot by slot and run SDPA (float32)."""
    outs = []
    for r in range(q.shape[0]):
        ctx = int(ctx_lens[r])
        pos = torch.arange(ctx)
        slots = tables[row_table[r]][pos // block_size] * block_size + pos % block_size
        k, v = k_cache[slots].float(), v_cache[slots].float()  # [ctx, Hkv, D]
        o = F.scaled_dot_product_attention(
            q[r].float().unsqueeze(1), k.transpose(0, 1), v.transpose(0, 1), scale=scale, enable_gqa=True
        )
        outs.append(o.squeeze(1))
    return torch.stack(outs)


def random_case(dtype, num_heads, num_kv_heads, head_dim, block_size, rows, max_ctx, shared_table=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    max_blocks = -(-max_ctx // block_size)
    num_blocks = 2 * max_blocks
    k_cache = torch.randn(num_blocks * block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks * block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    num_tables = 1 if shared_table else rows
    tables = torch.stack([torch.randperm(num_blocks, generator=g)[:max_blocks] for _ in range(num_tables)])
    row_table = torch.zeros(rows, dtype=torch.long) if shared_table else torch.arange(rows)
    ctx_lens = torch.randint(1, max_ctx + 1, (rows,), generator=g)
    ctx_lens[0] = max_ctx  # one full row, and the rest ragged (some shorter than a block)
    q = torch.randn(rows, num_heads, head_dim, generator=g).to(dtype)
    return q, k_cache, v_cache, tables.contiguous(), row_table, ctx_lens


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (9, 3), (8, 2), (16, 2), (32, 1)])
@pytest.mark.parametrize("head_dim", [64, 128, 80, 40])
def test_kernel_matches_gather_and_sdpa(dtype, num_heads, num_kv_heads, head_dim):
    block_size, scale = 16, head_dim**-0.5
    case = random_case(dtype, num_heads, num_kv_heads, head_dim, block_size, rows=7, max_ctx=150)
    got = cpu_paged.paged_attention(*case, block_size, scale)
    assert got.dtype == dtype and got.shape == case[0].shape
    want = reference(*case, block_size, scale)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the query (and output) rounded to bf16
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_rows_split_across_threads(dtype):
    """Enough rows that threads take whole rows (all KV heads of a row in turn)."""
    case = random_case(dtype, 9, 3, 64, 16, rows=4 * 2 * max(1, torch.get_num_threads()) + 3, max_ctx=90, seed=7)
    got = cpu_paged.paged_attention(*case, 16, 0.125)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), reference(*case, 16, 0.125), atol=tol, rtol=tol)


@pytest.mark.parametrize("block_size", [1, 8, 32, 64])
def test_block_sizes_and_rows_sharing_one_table(block_size):
    case = random_case(torch.float32, 6, 2, 64, block_size, rows=5, max_ctx=97, shared_table=True, seed=3)
    got = cpu_paged.paged_attention(*case, block_size, 0.125)
    torch.testing.assert_close(got, reference(*case, block_size, 0.125), atol=1e-5, rtol=1e-5)


def test_shapes_outside_the_limits_are_refused():
    q, k, v, tables, rows, lens = random_case(torch.float32, 4, 4, 64, 16, rows=2, max_ctx=20)
    assert not cpu_paged.supports(k, 64, 1, 64, 16)  # group of 64 > 32
    assert not cpu_paged.supports(k, 4, 4, 512, 16)  # head_dim 512 > 256
    assert not cpu_paged.supports(k.half(), 4, 4, 64, 16)
    with pytest.raises(ValueError, match="limits"):
        cpu_paged.paged_attention(q, k, v, tables, rows, lens, 128, 0.1)  # block size 128 > 64


def test_bfloat16_paths_by_head_size():
    paths = {d: cpu_paged.bf16_path(d) for d in (64, 80, 40)}
    assert paths[40] == "portable"
    if torch.backends.cpu.get_cpu_capability() in ("AVX512",) or "avx512" in paths[64]:
        assert paths[80] == "avx512-widen"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_decode_path_with_and_without_the_kernel(dtype):
    """attention.paged_attention for a decode batch: kernel metadata vs padded-mask SDPA metadata."""
    num_heads, num_kv_heads, head_dim, bs = 9, 3, 64, 16
    q, k_cache, v_cache, tables, rows, ctx_lens = random_case(
        dtype, num_heads, num_kv_heads, head_dim, bs, rows=6, max_ctx=70, seed=5
    )
    n, max_blocks = q.shape[0], tables.shape[1]
    new_k = torch.zeros(n, num_kv_heads, head_dim, dtype=dtype)  # written to each row's last slot
    last = ctx_lens - 1
    slot_mapping = tables[rows, last // bs] * bs + last % bs
    new_k.copy_(k_cache[slot_mapping])
    new_v = v_cache[slot_mapping].clone()
    kernel_meta = AttentionMetadata(
        slot_mapping=slot_mapping,
        block_size=bs,
        num_decode_tokens=n,
        decode_block_ids=tables.view(-1),
        decode_max_blocks=max_blocks,
        decode_ctx_lens=ctx_lens,
        decode_rows=rows,
    )
    padding = torch.arange(max_blocks * bs).unsqueeze(0) >= ctx_lens.unsqueeze(1)
    mask = torch.zeros(n, 1, 1, max_blocks * bs, dtype=dtype).masked_fill_(padding.view(n, 1, 1, -1), float("-inf"))
    sdpa_meta = AttentionMetadata(
        slot_mapping=slot_mapping,
        block_size=bs,
        num_decode_tokens=n,
        decode_block_ids=tables.view(-1),
        decode_max_blocks=max_blocks,
        decode_mask=mask,
    )
    scale = head_dim**-0.5
    got = paged_attention(q, new_k, new_v, k_cache.clone(), v_cache.clone(), kernel_meta, scale)
    want = paged_attention(q, new_k, new_v, k_cache.clone(), v_cache.clone(), sdpa_meta, scale)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


def test_loading_the_fast_math_library_keeps_subnormals():
    """Built with -ffast-math but linked without it: no flush-to-zero for the whole process."""
    import ctypes

    assert cpu_paged.load() is not None
    tiny = ctypes.c_float(1e-40).value  # a float32 subnormal
    assert tiny != 0.0 and torch.tensor([1e-40], dtype=torch.float32).mul(1.0).item() != 0.0
