"""Turns a scheduled step into tensors, runs the model, and samples the due requests.

Owns the KV cache: one tensor ``[layers, 2, num_blocks * block_size, kv_heads, head_dim]`` whose
per-layer K and V views are flat slot arrays (see ``tandem.models.layers.attention``). Inputs are built
on the CPU and moved to the device once per step; the same code runs on CPU and CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tandem.engine.request import Request
from tandem.engine.sampler import Sampler, SamplerOutput, SamplingRequestState
from tandem.engine.scheduler import ScheduledChunk
from tandem.kernels import paged_attention as cpu_paged
from tandem.kernels import prefill_attention as cpu_prefill
from tandem.models.config import ModelConfig
from tandem.models.layers.attention import AttentionMetadata, PrefillChunk, bottom_right_causal_mask
from tandem.models.llama import LlamaForCausalLM


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    element_size = torch.tensor([], dtype=dtype).element_size()
    return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * element_size


@dataclass
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    logits_indices: torch.Tensor
    """Flattened index of the last token of every request that gets a new token this step."""
    sampled_requests: list[Request]


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        cfg: ModelConfig,
        num_blocks: int,
        block_size: int,
        device: torch.device,
        dtype: torch.dtype,
        seed: int = 0,
    ) -> None:
        self.model, self.cfg = model, cfg
        self.block_size, self.num_blocks = block_size, num_blocks
        self.device, self.dtype = device, dtype
        self.kv_cache = torch.zeros(
            cfg.num_hidden_layers,
            2,
            num_blocks * block_size,
            cfg.num_key_value_heads,
            cfg.head_dim,
            dtype=dtype,
            device=device,
        )
        self.kv_caches = [(self.kv_cache[i, 0], self.kv_cache[i, 1]) for i in range(cfg.num_hidden_layers)]
        self.sampler = Sampler(seed=seed, device=device)
        self.decode_kernel = cpu_paged.supports(
            self.kv_cache, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, block_size
        )
        """Decode attention runs in the C paged-attention kernel (CPU), else gather + SDPA."""
        self.prefill_kernel = cpu_prefill.supports(
            self.kv_cache, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        )
        """Prefill attention runs in the AMX kernel (CPU with AMX, bfloat16 cache), else SDPA."""

    @torch.inference_mode()
    def execute(
        self, chunks: list[ScheduledChunk], eos_token_ids: frozenset[int]
    ) -> tuple[list[Request], SamplerOutput | None]:
        """Run one step; returns the requests that got a token and the sampler's output for them."""
        inputs = self.prepare_inputs(chunks)
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta)
        if not inputs.sampled_requests:
            return [], None
        logits = self.model.compute_logits(hidden.index_select(0, inputs.logits_indices))
        rows = [
            SamplingRequestState(r.sampling_params, r.prompt_token_ids, r.output_token_ids, r.generator)
            for r in inputs.sampled_requests
        ]
        return inputs.sampled_requests, self.sampler(logits, rows, eos_token_ids)

    def prepare_inputs(self, chunks: list[ScheduledChunk]) -> StepInputs:
        bs = self.block_size
        # Single-token chunks (decodes, or a prefill with one token left) share one batched path.
        decodes = [c for c in chunks if c.num_tokens == 1]
        prefills = [c for c in chunks if c.num_tokens > 1]
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[torch.Tensor] = []
        logits_indices: list[int] = []
        sampled: list[Request] = []
        block_tables = [torch.tensor([b.block_id for b in c.request.block_table], dtype=torch.long) for c in chunks]
        tables = dict(zip((id(c) for c in chunks), block_tables))

        for c in decodes:
            pos = c.request.num_computed_tokens
            token_ids.append(c.request.all_token_ids[pos])
            positions.append(pos)
        meta = AttentionMetadata(slot_mapping=torch.empty(0), block_size=bs, num_decode_tokens=len(decodes))
        if decodes:
            self._prepare_decode(decodes, tables, meta, slots)
        for i, c in enumerate(decodes):
            if c.request.num_computed_tokens + 1 == c.request.num_tokens:
                logits_indices.append(i)
                sampled.append(c.request)

        for c in prefills:
            start, req = c.request.num_computed_tokens, c.request
            end = start + c.num_tokens
            token_start = len(token_ids)
            token_ids.extend(req.all_token_ids[start:end])
            positions.extend(range(start, end))
            ctx_pos = torch.arange(0 if start > 0 and not self.prefill_kernel else start, end)
            ctx_slots = tables[id(c)][ctx_pos // bs] * bs + ctx_pos % bs
            slots.append(ctx_slots[-c.num_tokens :])
            chunk = PrefillChunk(token_start, c.num_tokens, end, None)
            if start > 0 and not self.prefill_kernel:
                chunk.context_slots = ctx_slots.to(self.device)
                chunk.causal_mask = bottom_right_causal_mask(c.num_tokens, end, self.device)
            meta.prefills.append(chunk)
            if end == req.num_tokens:
                logits_indices.append(len(token_ids) - 1)
                sampled.append(req)

        if prefills and self.prefill_kernel:
            self._prepare_prefill_kernel([tables[id(c)] for c in prefills], meta)
        meta.slot_mapping = torch.cat(slots).to(self.device)
        return StepInputs(
            input_ids=torch.tensor(token_ids, dtype=torch.long).to(self.device),
            positions=torch.tensor(positions, dtype=torch.long).to(self.device),
            meta=meta,
            logits_indices=torch.tensor(logits_indices, dtype=torch.long).to(self.device),
            sampled_requests=sampled,
        )

    @staticmethod
    def _prepare_prefill_kernel(tables: list[torch.Tensor], meta: AttentionMetadata) -> None:
        """Block tables and (start, tokens, context) of the prefill chunks, for the AMX kernel."""
        table = torch.zeros(len(tables), max(t.numel() for t in tables), dtype=torch.long)
        for row, t in enumerate(tables):
            table[row, : t.numel()] = t
        meta.prefill_block_table = table
        meta.prefill_chunk_info = torch.tensor(
            [(p.token_start, p.num_tokens, p.context_len) for p in meta.prefills], dtype=torch.long
        )

    def _prepare_decode(
        self,
        decodes: list[ScheduledChunk],
        tables: dict[int, torch.Tensor],
        meta: AttentionMetadata,
        slots: list[torch.Tensor],
    ) -> None:
        """Padded block table and padding mask of the decode rows; appends their new slots."""
        bs, n = self.block_size, len(decodes)
        ctx_lens = torch.tensor([c.request.num_computed_tokens + 1 for c in decodes])
        max_blocks = -(-int(ctx_lens.max()) // bs)
        table = torch.zeros(n, max_blocks, dtype=torch.long)
        for row, c in enumerate(decodes):
            t = tables[id(c)]
            table[row, : t.numel()] = t
        last = ctx_lens - 1
        rows = torch.arange(n)
        slots.append(table[rows, last // bs] * bs + last % bs)
        meta.decode_block_ids = table.view(-1).to(self.device)
        meta.decode_max_blocks = max_blocks
        if self.decode_kernel:
            meta.decode_ctx_lens, meta.decode_rows = ctx_lens, rows
            return
        # Additive float mask: SDPA's CPU kernels are much slower with a bool mask here.
        padding = torch.arange(max_blocks * bs).unsqueeze(0) >= ctx_lens.unsqueeze(1)
        mask = torch.zeros(n, 1, 1, max_blocks * bs, dtype=self.dtype)
        mask.masked_fill_(padding.view(n, 1, 1, -1), float("-inf"))
        meta.decode_mask = mask.to(self.device)

    # --- KV block export/import (raw bytes per block, for disaggregation) ---

    def read_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """KV of the given blocks as a CPU tensor [num_blocks, layers, 2, block_size, kv_heads, head_dim]."""
        view = self.kv_cache.view(
            self.cfg.num_hidden_layers,
            2,
            self.num_blocks,
            self.block_size,
            self.cfg.num_key_value_heads,
            self.cfg.head_dim,
        )
        index = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        return view.index_select(2, index).permute(2, 0, 1, 3, 4, 5).contiguous().cpu()

    def write_blocks(self, block_ids: list[int], data: torch.Tensor) -> None:
        """Inverse of read_blocks."""
        view = self.kv_cache.view(
            self.cfg.num_hidden_layers,
            2,
            self.num_blocks,
            self.block_size,
            self.cfg.num_key_value_heads,
            self.cfg.head_dim,
        )
        index = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        view.index_copy_(2, index, data.to(self.device, self.dtype).permute(1, 2, 0, 3, 4, 5))
