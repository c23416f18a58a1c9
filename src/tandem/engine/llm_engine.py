"""The builtin engine's synchronous core: add requests, ``step()``, read outputs.

One step = schedule → run the model on the scheduled chunks → sample the due requests →
append tokens, check stop conditions, free finished requests. ``AsyncEngine`` drives this from
a background thread; ``generate`` is the offline convenience used by tests and benchmarks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from tandem.engine.block_pool import BlockPool
from tandem.engine.config import EngineConfig
from tandem.engine.kv_cache_manager import KVCacheManager, cdiv
from tandem.engine.kv_events import KVEvent, KVEventBatch, make_batch
from tandem.engine.kv_transfer import KVBlockExport, export_to_tensor, tensor_to_export
from tandem.engine.model_runner import ModelRunner, kv_bytes_per_block
from tandem.engine.outputs import RequestOutput, TokenLogprob
from tandem.engine.request import Request, RequestStatus
from tandem.engine.sampling_params import SamplingParams
from tandem.engine.scheduler import Scheduler
from tandem.hashing import block_hashes, seed_for_salt
from tandem.models.loader import LoadedModel, load_model

logger = logging.getLogger(__name__)


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_usage: float
    """Fraction of KV blocks referenced by requests (0–1)."""
    num_total_blocks: int
    num_free_blocks: int
    prefix_cache_hit_rate: float
    """Cached blocks found ÷ blocks looked up, since start."""
    num_preemptions: int
    prompt_tokens_total: int
    cached_prompt_tokens_total: int
    generation_tokens_total: int
    steps_total: int


def check_stop(request: Request, token_id: int, eos_token_ids: frozenset[int],
               max_model_len: int) -> RequestStatus | None:
    """How a request ends after appending ``token_id``, or None if it goes on (shared by all engines)."""
    params = request.sampling_params
    if request.num_output_tokens >= params.min_tokens:
        if (token_id in eos_token_ids and not params.ignore_eos) or token_id in params.stop_token_ids:
            return RequestStatus.FINISHED_STOPPED
    if request.num_output_tokens >= params.max_tokens or request.num_tokens >= max_model_len:
        return RequestStatus.FINISHED_LENGTH
    return None


class LLMEngine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.loaded = loaded or load_model(config.model, config.dtype, config.device, config.max_model_len)
        cfg = self.loaded.config
        self.model_config = cfg
        self.max_model_len = self.loaded.max_model_len
        dtype = self.loaded.dtype
        num_blocks = config.num_kv_blocks or max(
            1, int(config.kv_cache_memory_gib * 2**30) // kv_bytes_per_block(cfg, config.block_size, dtype))
        self.block_size = config.block_size
        self.pool = BlockPool(num_blocks, config.block_size, config.enable_prefix_caching, config.enable_kv_events)
        self.kv = KVCacheManager(self.pool, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv, config.max_num_batched_tokens, config.max_num_seqs, self.max_model_len)
        self.runner = ModelRunner(self.loaded.model, cfg, num_blocks, config.block_size, self.loaded.device, dtype,
                                  seed=config.seed)
        self.eos_token_ids = frozenset(self.loaded.eos_token_ids)
        self.requests: dict[str, Request] = {}
        self._prompt_tokens = self._cached_tokens = self._generated_tokens = self._steps = 0
        self._kv_event_seq = 0

    # --- requests ---

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    cache_salt: str | None = None) -> None:
        """Queue a request; raises ValueError for a bad prompt or a duplicate id."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already running")
        self.validate_prompt(prompt_token_ids)
        request = Request(request_id, list(prompt_token_ids), params, self.block_size, cache_salt=cache_salt,
                          eos_token_ids=self.eos_token_ids)
        if params.seed is not None:
            request.generator = torch.Generator(self.loaded.device).manual_seed(params.seed)
        self.requests[request_id] = request
        self.scheduler.add_request(request)

    def validate_prompt(self, prompt_token_ids: list[int]) -> None:
        if not prompt_token_ids:
            raise ValueError("prompt must contain at least one token")
        vocab = self.model_config.vocab_size
        if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(prompt_token_ids)} tokens; this model's context is {self.max_model_len}")
        if cdiv(len(prompt_token_ids) + 1, self.block_size) > self.pool.num_blocks:
            raise ValueError(f"prompt of {len(prompt_token_ids)} tokens cannot fit in a KV cache of "
                             f"{self.pool.num_blocks} blocks")

    def abort_request(self, request_id: str) -> bool:
        """Stop a request and free its blocks; False if it is unknown or already finished."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return False
        self.scheduler.finish_request(request, RequestStatus.FINISHED_ABORTED)
        return True

    @property
    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished

    # --- the step ---

    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return []
        sampled, sample_out = self.runner.execute(sched.chunks, self.eos_token_ids)
        self.scheduler.finish_step(sched)
        self._steps += 1
        outputs: list[RequestOutput] = []
        for row, request in enumerate(sampled):
            token_id = sample_out.token_ids[row]
            request.append_output_token(token_id)
            self._generated_tokens += 1
            if request.num_output_tokens == 1:
                self._prompt_tokens += request.num_prompt_tokens
                self._cached_tokens += max(0, request.num_cached_tokens)
            status = self._check_stop(request, token_id)
            output = RequestOutput(request.request_id, [token_id], num_prompt_tokens=request.num_prompt_tokens,
                                   num_cached_tokens=max(0, request.num_cached_tokens),
                                   num_output_tokens=request.num_output_tokens)
            if sample_out.logprobs is not None and request.sampling_params.logprobs is not None:
                output.logprobs = [TokenLogprob(token_id, sample_out.logprobs[row], sample_out.top_logprobs[row])]
            if status is not None:
                output.finished, output.finish_reason = True, status.value
                if status is RequestStatus.FINISHED_STOPPED:
                    output.stop_token_id = token_id
                self.scheduler.finish_request(request, status)
                del self.requests[request.request_id]
            outputs.append(output)
        return outputs

    def _check_stop(self, request: Request, token_id: int) -> RequestStatus | None:
        return check_stop(request, token_id, self.eos_token_ids, self.max_model_len)

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
        """Run prompts to completion (offline); returns each request's output token ids."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"offline-{self._steps}-{i}" for i in range(len(prompts))]
        for rid, prompt, p in zip(ids, prompts, params_list):
            self.add_request(rid, prompt, p)
        results: dict[str, list[int]] = {rid: [] for rid in ids}
        while any(rid in self.requests for rid in ids):
            for out in self.step():
                if out.request_id in results:
                    results[out.request_id].extend(out.new_token_ids)
        return [results[rid] for rid in ids]

    # --- observability ---

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            kv_usage=self.pool.usage, num_total_blocks=self.pool.num_blocks,
            num_free_blocks=self.pool.num_free_blocks, prefix_cache_hit_rate=self.pool.prefix_cache_hit_rate,
            num_preemptions=self.scheduler.num_preemptions, prompt_tokens_total=self._prompt_tokens,
            cached_prompt_tokens_total=self._cached_tokens, generation_tokens_total=self._generated_tokens,
            steps_total=self._steps,
        )

    def take_kv_events(self) -> list[KVEvent]:
        """The block pool's events since the last call, in order (no sequence number)."""
        return self.pool.take_events()

    def take_kv_event_batch(self) -> tuple[int, KVEventBatch] | None:
        """Pending events as one batch with this engine's next sequence number (0, 1, 2, ...).

        The number is what a publisher puts on the wire, so a subscriber can detect a gap.
        None when nothing happened since the last batch.
        """
        events = self.pool.take_events()
        if not events:
            return None
        seq = self._kv_event_seq
        self._kv_event_seq += 1
        return seq, make_batch(events)

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_prefix_cache()

    # --- KV export / import ---

    def export_kv(self, prompt_token_ids: list[int], cache_salt: str | None = None) -> KVBlockExport:
        """The cached KV of the prompt's leading full blocks (as many as the cache holds)."""
        seed = seed_for_salt(cache_salt)
        hashes = block_hashes(prompt_token_ids, self.block_size, seed)
        blocks = self.pool.find_cached_blocks(hashes)
        n = len(blocks)
        data = self.runner.read_blocks([b.block_id for b in blocks])
        return tensor_to_export(data, hashes[:n], list(prompt_token_ids[: n * self.block_size]), self.block_size, seed)

    def import_kv(self, export: KVBlockExport) -> int:
        """Write exported blocks into this engine's prefix cache; returns how many were new."""
        if export.block_size != self.block_size:
            raise ValueError(f"block_size {export.block_size} does not match this engine's {self.block_size}")
        cfg = self.model_config
        shape = [cfg.num_hidden_layers, 2, self.block_size, cfg.num_key_value_heads, cfg.head_dim]
        data = export_to_tensor(export, shape, self.runner.dtype)
        present = self.pool.find_cached_blocks(list(export.block_hashes))
        num_present = len(present)
        new = len(export.block_hashes) - num_present
        if new == 0:
            return 0
        # Hold the blocks already present so allocating the new ones cannot evict them.
        self.pool.touch(present)
        if new > self.pool.num_free_blocks:
            self.pool.free(list(reversed(present)))
            raise ValueError(f"no room for {new} imported blocks ({self.pool.num_free_blocks} free)")
        blocks = self.pool.allocate(new)
        self.runner.write_blocks([b.block_id for b in blocks], data[num_present:])
        bs = self.block_size
        parent = export.block_hashes[num_present - 1] if num_present else None
        self.pool.cache_full_blocks(blocks, list(export.block_hashes[num_present:]),
                                    list(export.token_ids[num_present * bs:]), parent)
        self.pool.free(list(reversed(present + blocks)))
        return new
