"""The AMX prefill-attention kernel against per-chunk SDPA on the same paged cache: GQA group
sizes, head sizes, block sizes, chunks with and without a cached prefix, ragged lengths (query
tiles and key tiles cut short), queries strided like a view of the fused QKV output, and the
engine's prefill path (attention.paged_attention) with the kernel on and off. Skipped where the
CPU has no AMX-BF16 (the engine then keeps SDPA)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tandem.kernels import prefill_attention as cpu_prefill
from tandem.models.layers.attention import AttentionMetadata, PrefillChunk, bottom_right_causal_mask, paged_attention

pytestmark = pytest.mark.skipif(not cpu_prefill.available(), reason="no AMX-BF16 (or no C compiler) here")


def random_case(num_heads, num_kv_heads, head_dim, block_size, chunks, seed=0):
    """chunks: (queries, context) per chunk; returns q (a strided view), caches, tables, info."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-ctx // block_size) for _, ctx in chunks) + 3
    k_cache = torch.randn(num_blocks * block_size, num_kv_heads, head_dim, generator=g).bfloat16()
    v_cache = torch.randn(num_blocks * block_size, num_kv_heads, head_dim, generator=g).bfloat16()
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.zeros(len(chunks), max(-(-ctx // block_size) for _, ctx in chunks), dtype=torch.long)
    info, used, start = [], 0, 0
    for c, (n, ctx) in enumerate(chunks):
        blocks = -(-ctx // block_size)
        tables[c, :blocks] = perm[used : used + blocks]
        used += blocks
        info.append((start, n, ctx))
        start += n
    qkv = torch.randn(start, num_heads + 2 * num_kv_heads, head_dim, generator=g).bfloat16()
    return qkv[:, :num_heads], k_cache, v_cache, tables, torch.tensor(info, dtype=torch.long)


def reference(q, k_cache, v_cache, tables, info, block_size, scale):
    """Per chunk: gather its context slot by slot, SDPA in float32 with a bottom-right causal mask."""
    out = torch.empty(q.shape, dtype=torch.float32)
    for c in range(info.shape[0]):
        start, n, ctx = info[c].tolist()
        pos = torch.arange(ctx)
        slots = tables[c][pos // block_size] * block_size + pos % block_size
        k = k_cache[slots].float().transpose(0, 1).unsqueeze(0)
        v = v_cache[slots].float().transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(
            q[start : start + n].float().transpose(0, 1).unsqueeze(0),
            k,
            v,
            attn_mask=bottom_right_causal_mask(n, ctx, q.device),
            scale=scale,
            enable_gqa=True,
        )
        out[start : start + n] = o[0].transpose(0, 1)
    return out


def run_kernel(case, block_size, scale):
    q, k_cache, v_cache, tables, info = case
    out = torch.full(q.shape, float("nan"), dtype=torch.bfloat16)
    cpu_prefill.prefill_attention(q, k_cache, v_cache, tables, info, block_size, scale, out)
    return out


# bf16 inputs, probabilities rounded to bf16 before P·V (as in FlashAttention), output in bf16.
TOL = dict(atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(9, 3), (4, 4), (8, 2), (16, 1)])
@pytest.mark.parametrize("head_dim", [32, 64, 96, 128])
def test_kernel_matches_sdpa(num_heads, num_kv_heads, head_dim):
    chunks = [(37, 100), (1, 5), (17, 17), (64, 64), (90, 300)]
    case = random_case(num_heads, num_kv_heads, head_dim, 16, chunks, seed=head_dim)
    scale = head_dim**-0.5
    torch.testing.assert_close(run_kernel(case, 16, scale).float(), reference(*case, 16, scale), **TOL)


@pytest.mark.parametrize("block_size", [1, 8, 32, 64])
def test_block_sizes(block_size):
    case = random_case(6, 2, 64, block_size, [(40, 40), (33, 97)], seed=block_size)
    torch.testing.assert_close(run_kernel(case, block_size, 0.125).float(), reference(*case, block_size, 0.125), **TOL)


def test_long_context_chunk_and_many_chunks():
    """A late chunk of a long sequence (keys mostly cached) beside many small fresh ones."""
    chunks = [(128, 1500)] + [(20 + i, 20 + i) for i in range(12)]
    case = random_case(9, 3, 64, 16, chunks, seed=11)
    torch.testing.assert_close(run_kernel(case, 16, 0.125).float(), reference(*case, 16, 0.125), **TOL)


def test_shapes_outside_the_limits():
    q, k_cache, v_cache, tables, info = random_case(4, 4, 64, 16, [(8, 8)])
    assert not cpu_prefill.supports(k_cache, 4, 4, 80)  # head size not a multiple of 32
    assert not cpu_prefill.supports(k_cache, 4, 4, 512)
    assert not cpu_prefill.supports(k_cache.float(), 4, 4, 64)
    bad = info.clone()
    bad[0, 2] = 4  # fewer keys than queries
    with pytest.raises(ValueError, match="status -1"):
        cpu_prefill.prefill_attention(q, k_cache, v_cache, tables, bad, 16, 0.125, torch.empty(q.shape, dtype=q.dtype))


def test_engine_prefill_path_with_and_without_the_kernel():
    """attention.paged_attention for a step of prefill chunks: kernel metadata vs the SDPA path
    (fresh chunks on SDPA's causal path, cached-prefix chunks gathered with a mask)."""
    num_heads, num_kv_heads, head_dim, bs = 9, 3, 64, 16
    chunks = [(50, 50), (30, 130), (16, 16)]
    q, k_cache, v_cache, tables, info = random_case(num_heads, num_kv_heads, head_dim, bs, chunks, seed=4)
    slots, prefills = [], []
    for c, (start, n, ctx) in enumerate(info.tolist()):
        pos = torch.arange(ctx)
        ctx_slots = tables[c][pos // bs] * bs + pos % bs
        slots.append(ctx_slots[ctx - n :])
        chunk = PrefillChunk(start, n, ctx, None)
        if ctx > n:
            chunk.context_slots, chunk.causal_mask = ctx_slots, bottom_right_causal_mask(n, ctx, q.device)
        prefills.append(chunk)
    slot_mapping = torch.cat(slots)
    new_k, new_v = k_cache[slot_mapping].clone(), v_cache[slot_mapping].clone()
    sdpa_meta = AttentionMetadata(slot_mapping=slot_mapping, block_size=bs, prefills=prefills)
    kernel_meta = AttentionMetadata(
        slot_mapping=slot_mapping, block_size=bs, prefills=prefills, prefill_block_table=tables, prefill_chunk_info=info
    )
    scale = head_dim**-0.5
    got = paged_attention(q, new_k, new_v, k_cache.clone(), v_cache.clone(), kernel_meta, scale)
    want = paged_attention(q, new_k, new_v, k_cache.clone(), v_cache.clone(), sdpa_meta, scale)
    torch.testing.assert_close(got.float(), want.float(), **TOL)
