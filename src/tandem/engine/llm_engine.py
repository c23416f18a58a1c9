"""The builtin engine's synchronous core: add requests, ``step()``, read outputs.

One step = schedule → run the model on the scheduled chunks → sample the due requests →
append tokens, check stop conditions, free finished requests. ``AsyncEngine`` drives this from
a background thread; ``generate`` is the offline convenience used by tests and benchmarks.
"""

from __future__ import annotations

import logging

import torch

from tandem.engine.block_pool import KVBlock
from tandem.engine.config import EngineConfig
from tandem.engine.engine_core import EngineCore
from tandem.engine.kv_tiers.block_meta import block_meta
from tandem.engine.kv_tiers.onboard import TierOnboarder
from tandem.engine.kv_tiers.tiers import KvLayout, KvTiers
from tandem.engine.kv_transfer import export_to_tensor, tensor_to_export
from tandem.engine.model_runner import ModelRunner, kv_bytes_per_block
from tandem.engine.outputs import RequestOutput, TokenLogprob
from tandem.engine.request import Request
from tandem.models.loader import LoadedModel, load_model
from tandem.protocols.kv_export import KVBlockExport

logger = logging.getLogger(__name__)


class LLMEngine(EngineCore):
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.loaded = loaded or load_model(config.model, config.dtype, config.device, config.max_model_len)
        cfg = self.loaded.config
        self.model_config = cfg
        dtype = self.loaded.dtype
        num_blocks = config.num_kv_blocks or max(
            1, int(config.kv_cache_memory_gib * 2**30) // kv_bytes_per_block(cfg, config.block_size, dtype)
        )
        super().__init__(
            num_blocks=num_blocks,
            block_size=config.block_size,
            max_model_len=self.loaded.max_model_len,
            vocab_size=cfg.vocab_size,
            eos_token_ids=frozenset(self.loaded.eos_token_ids),
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_num_seqs=config.max_num_seqs,
            enable_prefix_caching=config.enable_prefix_caching,
            enable_kv_events=config.enable_kv_events,
        )
        self.runner = ModelRunner(
            self.loaded.model, cfg, num_blocks, config.block_size, self.loaded.device, dtype, seed=config.seed
        )
        self._written_through: list[tuple[KVBlock, int]] = []
        self.kv_tiers: KvTiers | None = None
        """The tiers below the pool (also ``self.tiers``, typed for what the core needs)."""
        if config.kv_tiers.enabled:
            self._start_tiers()

    # --- KV tiers ---

    def _start_tiers(self) -> None:
        cfg, bs = self.model_config, self.block_size
        shape = [cfg.num_hidden_layers, 2, bs, cfg.num_key_value_heads, cfg.head_dim]
        dtype = self.runner.dtype
        layout_id = f"{self.loaded.source}|{self.loaded.name}|{dtype}|{shape}"
        tiers = KvTiers(self.config.kv_tiers, KvLayout(bs, shape, dtype, layout_id))
        self.tiers = self.kv_tiers = tiers
        self.pool.on_evict = self._offload
        if self.config.kv_tiers.offload_policy == "write-through":
            self.pool.on_cached = self._write_through
        self.scheduler.tiers = TierOnboarder(tiers, self.runner.write_blocks)

    def _offload(self, blocks: list[KVBlock]) -> None:
        """Copy cached blocks the pool is about to reuse down to the tiers (their KV is intact)."""
        assert self.kv_tiers is not None
        metas = [block_meta(b) for b in blocks]
        wanted = self.kv_tiers.needs_bytes(metas)
        chosen = [i for i, want in enumerate(wanted) if want]
        if not chosen:
            return
        data = self.runner.read_blocks([blocks[i].block_id for i in chosen])
        self.kv_tiers.offload([metas[i] for i in chosen], data)

    def _write_through(self, blocks: list[KVBlock]) -> None:
        # Copied at the end of the step, in one batch; a block evicted before then was offloaded
        # by _offload already, so only blocks still holding the same hash are copied.
        self._written_through.extend((b, b.block_hash or 0) for b in blocks)

    def _flush_write_through(self) -> None:
        pending, self._written_through = self._written_through, []
        blocks = [b for b, h in pending if b.block_hash == h and h]
        if blocks:
            self._offload(blocks)

    def _on_added(self, request: Request) -> None:
        if request.sampling_params.seed is not None:
            request.generator = torch.Generator(self.loaded.device).manual_seed(request.sampling_params.seed)

    # --- the step ---

    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        if sched.is_empty:
            if self.scheduler.loading and self.scheduler.tiers is not None:
                self.scheduler.tiers.wait(0.01)  # only onboarding requests: wait for their blocks
            return []
        sampled, sample_out = self.runner.execute(sched.chunks, self.eos_token_ids)
        self.scheduler.finish_step(sched)
        if self._written_through:
            self._flush_write_through()
        self._steps += 1
        outputs: list[RequestOutput] = []
        if sample_out is None:  # no request got a token this step (sampled is empty)
            return outputs
        logprobs = None
        if sample_out.logprobs is not None:
            assert sample_out.top_logprobs is not None  # the sampler sets both or neither
            logprobs = (sample_out.logprobs, sample_out.top_logprobs)
        for row, request in enumerate(sampled):
            token_id = sample_out.token_ids[row]
            wants_logprobs = request.sampling_params.logprobs is not None
            output = self._emit_token(request, token_id)
            if logprobs is not None and wants_logprobs:
                output.logprobs = [TokenLogprob(token_id, logprobs[0][row], logprobs[1][row])]
            outputs.append(output)
        return outputs

    # --- KV export / import ---

    def export_kv(self, prompt_token_ids: list[int], cache_salt: str | None = None) -> KVBlockExport:
        """The cached KV of the prompt's leading full blocks (as many as the cache holds)."""
        seed, hashes, blocks = self._cached_prefix(prompt_token_ids, cache_salt)
        n = len(blocks)
        data = self.runner.read_blocks([b.block_id for b in blocks])
        return tensor_to_export(data, hashes[:n], list(prompt_token_ids[: n * self.block_size]), self.block_size, seed)

    def import_kv(self, export: KVBlockExport) -> int:
        """Write exported blocks into this engine's prefix cache; returns how many were new."""
        self._check_import_block_size(export.block_size)
        cfg = self.model_config
        shape = [cfg.num_hidden_layers, 2, self.block_size, cfg.num_key_value_heads, cfg.head_dim]
        data = export_to_tensor(export, shape, self.runner.dtype)
        try:
            return self._import_blocks(
                list(export.block_hashes),
                list(export.token_ids),
                lambda block_ids, first: self.runner.write_blocks(block_ids, data[first:]),  # noqa: F821 - runs before the del
                export.parent_hash,
                export.hash_seed,
            )
        finally:
            del data  # may view the caller's buffer (a pulled payload): let it be released
