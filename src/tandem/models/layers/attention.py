"""Attention over the paged KV cache, in plain PyTorch so one code path serves CPU and CUDA.

The KV cache of one layer is a flat slot array ``[num_blocks * block_size, kv_heads, head_dim]``;
token t of a request lives at slot ``block_table[t // block_size] * block_size + t % block_size``.

Each step's tokens arrive flattened, decode tokens first, then one chunk per prefilling request:

* new K/V are written to their slots (``index_copy_`` by ``slot_mapping``);
* decode rows, on CPU, go to Tandem's C paged-attention kernel (``tandem.kernels.paged_attention``),
  which reads each row's K/V blocks in place through its block table;
* elsewhere (CUDA, or no C compiler) decode rows gather their whole context, block by block, in
  one batched ``index_select`` into ``[batch, max_blocks * block_size, kv_heads, head_dim]``
  (whole blocks: half the cost of a per-slot gather) and run one SDPA call with an additive
  padding mask; the query heads that share a KV head are folded into the query-length axis, so
  GQA needs no K/V copy;
* each prefill chunk attends to its cached prefix plus itself with a causal mask aligned to the
  bottom-right (query i sees keys ``0 .. num_cached + i``). On a CPU with AMX and a bfloat16
  cache, every chunk of the step goes to Tandem's AMX prefill kernel
  (``tandem.kernels.prefill_attention``) in one call, reading cached prefix and new K/V in place
  through the block tables. Elsewhere a chunk with no cached prefix uses the new K/V directly
  with SDPA's own causal path, and one with a prefix gathers it and passes SDPA a mask. (The
  decode kernel could serve prefill rows too, but one query row at a time it is ~5x slower than
  gather + SDPA: benchmarks/cpu_kernel_choices.py.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tandem.kernels import paged_attention as cpu_paged
from tandem.kernels import prefill_attention as cpu_prefill


@dataclass
class PrefillChunk:
    """One request's prefill chunk inside the flattened step."""

    token_start: int
    """Index of the chunk's first token in the step's flattened tokens."""
    num_tokens: int
    """Tokens in this chunk (queries)."""
    context_len: int
    """Keys it attends to: cached/earlier tokens plus this chunk."""
    context_slots: torch.Tensor | None
    """Slots of all context_len keys; None when the chunk has no cached prefix (keys = the chunk)."""
    causal_mask: torch.Tensor | None = None
    """Bottom-right aligned bool mask [num_tokens, context_len], only when context_slots is set."""


@dataclass
class AttentionMetadata:
    """Per-step tensors shared by every layer."""

    slot_mapping: torch.Tensor
    """[num_tokens] slot of each new token."""
    block_size: int = 16
    num_decode_tokens: int = 0
    decode_block_ids: torch.Tensor | None = None
    """[num_decode * max_blocks] block table of every decode row, padded with block 0."""
    decode_max_blocks: int = 0
    decode_mask: torch.Tensor | None = None
    """[num_decode, 1, 1, max_blocks * block_size] additive mask: 0 on real keys, -inf on padding
    (gather + SDPA path only)."""
    decode_ctx_lens: torch.Tensor | None = None
    """[num_decode] keys of each decode row; set when the C kernel serves decode rows."""
    decode_rows: torch.Tensor | None = None
    """[num_decode] row i reads block table i (``arange``); C kernel path only."""
    prefills: list[PrefillChunk] = field(default_factory=list)
    prefill_block_table: torch.Tensor | None = None
    """[num_prefills, max_blocks] block table of each prefill chunk's sequence; set (with
    prefill_chunk_info) when the AMX prefill kernel serves the chunks."""
    prefill_chunk_info: torch.Tensor | None = None
    """[num_prefills, 3] int64: (token_start, num_tokens, context_len) of each chunk."""

    @property
    def decode_block_table(self) -> torch.Tensor:
        """decode_block_ids as ``[num_decode, max_blocks]``."""
        assert self.decode_block_ids is not None  # read only in steps with decode rows, which set it
        return self.decode_block_ids.view(self.num_decode_tokens, self.decode_max_blocks)


def bottom_right_causal_mask(num_queries: int, num_keys: int, device: torch.device) -> torch.Tensor:
    """Query i (the i-th of the last num_queries positions) may see keys 0 .. num_keys - num_queries + i."""
    q_pos = torch.arange(num_queries, device=device).unsqueeze(1) + (num_keys - num_queries)
    return torch.arange(num_keys, device=device).unsqueeze(0) <= q_pos


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    kv_stored: bool = False,
) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D]; caches [slots, Hkv, D]. Returns [T, Hq, D].

    The new k/v are written to their slots first, unless ``kv_stored`` says the caller did."""
    if not kv_stored:
        k_cache.index_copy_(0, meta.slot_mapping, k)
        v_cache.index_copy_(0, meta.slot_mapping, v)
    num_heads, num_kv_heads, head_dim = q.shape[1], k.shape[1], q.shape[2]
    out = torch.empty_like(q)
    n_dec = meta.num_decode_tokens
    if n_dec and meta.decode_ctx_lens is not None:
        assert meta.decode_rows is not None  # set together with decode_ctx_lens
        out[:n_dec] = cpu_paged.paged_attention(
            q[:n_dec],
            k_cache,
            v_cache,
            meta.decode_block_table,
            meta.decode_rows,
            meta.decode_ctx_lens,
            meta.block_size,
            scale,
        )
    elif n_dec:
        assert meta.decode_block_ids is not None  # every step with decode rows sets it
        group = num_heads // num_kv_heads
        # Query heads h = kv * group + g all read KV head kv: fold g into the query axis.
        qd = q[:n_dec].view(n_dec, num_kv_heads, group, head_dim)
        blocked = (-1, meta.block_size, num_kv_heads, head_dim)
        keys = (n_dec, meta.decode_max_blocks * meta.block_size, num_kv_heads, head_dim)
        kd = k_cache.view(blocked).index_select(0, meta.decode_block_ids).view(keys)
        vd = v_cache.view(blocked).index_select(0, meta.decode_block_ids).view(keys)
        od = F.scaled_dot_product_attention(
            qd, kd.transpose(1, 2), vd.transpose(1, 2), attn_mask=meta.decode_mask, scale=scale
        )
        out[:n_dec] = od.reshape(n_dec, num_heads, head_dim)
    if meta.prefill_chunk_info is not None:
        assert meta.prefill_block_table is not None  # set together with prefill_chunk_info
        cpu_prefill.prefill_attention(
            q, k_cache, v_cache, meta.prefill_block_table, meta.prefill_chunk_info, meta.block_size, scale, out
        )
        return out
    for chunk in meta.prefills:
        s, n = chunk.token_start, chunk.num_tokens
        qp = q[s : s + n].transpose(0, 1).unsqueeze(0)  # [1, Hq, n, D]
        if chunk.context_slots is None:
            kp, vp = k[s : s + n], v[s : s + n]
            mask, causal = None, True
        else:
            kp = k_cache.index_select(0, chunk.context_slots)
            vp = v_cache.index_select(0, chunk.context_slots)
            mask, causal = chunk.causal_mask, False
        op = F.scaled_dot_product_attention(
            qp,
            kp.transpose(0, 1).unsqueeze(0),
            vp.transpose(0, 1).unsqueeze(0),
            attn_mask=mask,
            is_causal=causal,
            scale=scale,
            enable_gqa=num_heads != num_kv_heads,
        )
        out[s : s + n] = op[0].transpose(0, 1)
    return out
