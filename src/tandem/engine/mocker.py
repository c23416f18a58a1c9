"""Mocker engine (``--engine mocker``): the builtin engine's block pool and scheduler with a
modeled step time in place of a model.

One step = schedule → model the step's time → sleep for it (÷ ``speedup_ratio``) → advance the
scheduler → append one plausible token per due request → stop checks → outputs. The block pool,
prefix cache, preemption, KV events and statistics are the real ones (``BlockPool``,
``KVCacheManager``, ``Scheduler``, ``Request`` exactly as ``LLMEngine`` uses them), so a router or
a planner sees a worker that behaves like a real one at a fraction of the cost. ``MockerEngine``
has ``LLMEngine``'s public interface, so ``AsyncEngine`` drives it unchanged, and several can
share one process (each owns its pool, scheduler and RNGs; ``time.sleep`` releases the GIL).

Step time model (milliseconds; defaults are NVIDIA Dynamo's published mocker polynomial):

* prefill: ``prefill_ms(T) = a·T² + b·T + c`` with T = uncached tokens scheduled this step
  (prompt chunks, and recomputation after a preemption; prefix-cache hits are never scheduled so
  never count). Only when T > 0.
* decode: ``decode_ms(u) = max(decode_min_ms, d·u² + e·u + f)`` with u = the pool's KV usage
  fraction after this step's allocation. Only when at least one decode row (a request computing
  the single token it sampled last step) is in the batch.
* a mixed step costs the **sum** of both parts; an empty step costs nothing.

Sampled tokens are drawn uniformly from ``[first_token_id, vocab_size)`` by a per-request
``random.Random`` (seeded from ``SamplingParams.seed`` or from ``MockerConfig.seed`` and the
request id), skipping EOS — so ``max_tokens`` (or a stop token id drawn by chance, or the context
length) ends a request. Stop rules are ``llm_engine.check_stop``, shared with the builtin engine.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from dataclasses import dataclass

from tandem.engine.block_pool import BlockPool
from tandem.engine.kv_cache_manager import KVCacheManager, cdiv
from tandem.engine.kv_events import KVEvent, KVEventBatch, make_batch
from tandem.engine.kv_transfer import KVBlockExport
from tandem.engine.llm_engine import EngineStats, check_stop
from tandem.engine.outputs import RequestOutput
from tandem.engine.request import Request, RequestStatus
from tandem.engine.sampling_params import SamplingParams
from tandem.engine.scheduler import Scheduler, SchedulerOutput
from tandem.hashing import DEFAULT_BLOCK_SIZE, block_hashes, seed_for_salt

logger = logging.getLogger(__name__)


@dataclass
class MockerConfig:
    """Everything that shapes one mocker engine instance."""

    vocab_size: int = 49152
    """Prompt token ids must lie in [0, vocab_size); sampled ids lie in [first_token_id, vocab_size)."""
    max_model_len: int = 8192
    """Longest prompt + output."""
    eos_token_id: int = 2
    """The EOS id (never sampled; kept for the stop rules and for parity with a real model)."""
    first_token_id: int = 3
    """Smallest id the mocker samples (skips the usual special ids 0–2)."""
    block_size: int = DEFAULT_BLOCK_SIZE
    """Tokens per KV block; must match what the router hashes."""
    num_kv_blocks: int = 16384
    """KV pool size in blocks."""
    max_num_batched_tokens: int = 2048
    """Token budget of one step: decode tokens plus prefill chunks."""
    max_num_seqs: int = 256
    """Most requests running at once."""
    enable_prefix_caching: bool = True
    """Reuse KV blocks of identical prefixes (keyed by the block-hashing contract)."""
    enable_kv_events: bool = True
    """Record BlockStored/BlockRemoved/AllBlocksCleared for the router."""
    speedup_ratio: float = 1.0
    """The modeled time is divided by this before sleeping; 0 = never sleep."""
    prefill_quadratic: float = 4.21e-7
    """a in prefill_ms = a·T² + b·T + c (T = uncached tokens in the step)."""
    prefill_linear: float = 0.01518
    """b in prefill_ms."""
    prefill_constant: float = 16.5
    """c in prefill_ms."""
    decode_quadratic: float = -25.74
    """d in decode_ms = max(decode_min_ms, d·u² + e·u + f) (u = KV usage fraction)."""
    decode_linear: float = 54.01
    """e in decode_ms."""
    decode_constant: float = 5.74
    """f in decode_ms."""
    decode_min_ms: float = 1.0
    """Floor of decode_ms."""
    seed: int = 0
    """Base seed of the per-request token RNGs for requests that bring no seed."""

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be positive, got {self.num_kv_blocks}")
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be positive")
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}")
        if self.speedup_ratio < 0:
            raise ValueError(f"speedup_ratio must be non-negative (0 = no delay), got {self.speedup_ratio}")
        if not 0 <= self.first_token_id < self.vocab_size:
            raise ValueError(f"first_token_id must be in [0, vocab_size), got {self.first_token_id}")
        if self.vocab_size - self.first_token_id < 2 and self.first_token_id <= self.eos_token_id < self.vocab_size:
            raise ValueError("the sampling range holds no token besides EOS")

    def prefill_ms(self, num_tokens: int) -> float:
        """Modeled time of prefilling ``num_tokens`` uncached tokens (0 when there are none)."""
        if num_tokens <= 0:
            return 0.0
        t = float(num_tokens)
        return self.prefill_quadratic * t * t + self.prefill_linear * t + self.prefill_constant

    def decode_ms(self, kv_usage: float) -> float:
        """Modeled time of one decode pass at KV usage fraction ``kv_usage``."""
        u = float(kv_usage)
        return max(self.decode_min_ms, self.decode_quadratic * u * u + self.decode_linear * u + self.decode_constant)

    def step_ms(self, num_prefill_tokens: int, num_decode_rows: int, kv_usage: float) -> float:
        """A step's modeled time: prefill part + decode part (each only when present)."""
        ms = self.prefill_ms(num_prefill_tokens)
        if num_decode_rows > 0:
            ms += self.decode_ms(kv_usage)
        return ms


def _request_seed(base_seed: int, request_id: str) -> int:
    digest = hashlib.blake2b(f"{base_seed}:{request_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class MockerEngine:
    """``LLMEngine``'s interface over a real scheduler and block pool, with modeled step times."""

    def __init__(self, config: MockerConfig | None = None) -> None:
        config = config or MockerConfig()
        self.config = config
        self.max_model_len = config.max_model_len
        self.block_size = config.block_size
        self.vocab_size = config.vocab_size
        self.pool = BlockPool(config.num_kv_blocks, config.block_size, config.enable_prefix_caching,
                              config.enable_kv_events)
        self.kv = KVCacheManager(self.pool, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv, config.max_num_batched_tokens, config.max_num_seqs, self.max_model_len)
        self.eos_token_ids = frozenset([config.eos_token_id])
        self.requests: dict[str, Request] = {}
        self._rngs: dict[str, random.Random] = {}
        self._prompt_tokens = self._cached_tokens = self._generated_tokens = self._steps = 0
        self._kv_event_seq = 0
        self.last_step_ms = 0.0
        """Modeled time of the latest non-empty step (before the speedup ratio)."""
        self.total_modeled_ms = 0.0
        """Sum of every step's modeled time since start (before the speedup ratio)."""
        self.total_slept_s = 0.0
        """Wall time actually spent sleeping, since start."""
        self.last_step_prefill_tokens = 0
        self.last_step_decode_rows = 0

    # --- requests ---

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    cache_salt: str | None = None) -> None:
        """Queue a request; raises ValueError for a bad prompt or a duplicate id."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already running")
        self.validate_prompt(prompt_token_ids)
        request = Request(request_id, list(prompt_token_ids), params, self.block_size, cache_salt=cache_salt,
                          eos_token_ids=self.eos_token_ids)
        seed = params.seed if params.seed is not None else _request_seed(self.config.seed, request_id)
        self._rngs[request_id] = random.Random(seed)
        self.requests[request_id] = request
        self.scheduler.add_request(request)

    def validate_prompt(self, prompt_token_ids: list[int]) -> None:
        if not prompt_token_ids:
            raise ValueError("prompt must contain at least one token")
        vocab = self.vocab_size
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
        self._rngs.pop(request_id, None)
        self.scheduler.finish_request(request, RequestStatus.FINISHED_ABORTED)
        return True

    @property
    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished

    # --- the step ---

    def modeled_step_ms(self, sched: SchedulerOutput) -> tuple[float, int, int]:
        """(modeled ms, uncached prefill tokens, decode rows) of a scheduled, not yet finished step."""
        prefill_tokens = decode_rows = 0
        for chunk in sched.chunks:
            request = chunk.request
            is_decode = (chunk.num_tokens == 1 and request.num_output_tokens > 0
                         and request.num_computed_tokens == request.num_tokens - 1)
            if is_decode:
                decode_rows += 1
            else:
                prefill_tokens += chunk.num_tokens
        return self.config.step_ms(prefill_tokens, decode_rows, self.pool.usage), prefill_tokens, decode_rows

    def step(self) -> list[RequestOutput]:
        start = time.perf_counter()
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return []
        ms, self.last_step_prefill_tokens, self.last_step_decode_rows = self.modeled_step_ms(sched)
        self.last_step_ms = ms
        self.total_modeled_ms += ms
        self._sleep_until(start, ms)
        due = self.scheduler.finish_step(sched)
        self._steps += 1
        outputs: list[RequestOutput] = []
        for request in due:
            token_id = self._sample(request)
            request.append_output_token(token_id)
            self._generated_tokens += 1
            if request.num_output_tokens == 1:
                self._prompt_tokens += request.num_prompt_tokens
                self._cached_tokens += max(0, request.num_cached_tokens)
            # The builtin engine's stop rules, verbatim (it reads only eos_token_ids and max_model_len).
            status = check_stop(request, token_id, self.eos_token_ids, self.max_model_len)
            output = RequestOutput(request.request_id, [token_id], num_prompt_tokens=request.num_prompt_tokens,
                                   num_cached_tokens=max(0, request.num_cached_tokens),
                                   num_output_tokens=request.num_output_tokens)
            if status is not None:
                output.finished, output.finish_reason = True, status.value
                if status is RequestStatus.FINISHED_STOPPED:
                    output.stop_token_id = token_id
                self.scheduler.finish_request(request, status)
                del self.requests[request.request_id]
                self._rngs.pop(request.request_id, None)
            outputs.append(output)
        return outputs

    def _sleep_until(self, start: float, ms: float) -> None:
        """Sleep so the step lasts ms ÷ speedup_ratio in all (bookkeeping time counts toward it)."""
        ratio = self.config.speedup_ratio
        if ratio <= 0 or ms <= 0:
            return
        remaining = start + ms / 1000.0 / ratio - time.perf_counter()
        if remaining > 0:
            time.sleep(remaining)
            self.total_slept_s += remaining

    def _sample(self, request: Request) -> int:
        rng = self._rngs.get(request.request_id)
        if rng is None:  # not reachable through add_request; keeps a hand-built request working
            rng = self._rngs[request.request_id] = random.Random(_request_seed(self.config.seed, request.request_id))
        lo, hi = self.config.first_token_id, self.vocab_size
        while True:
            token_id = rng.randrange(lo, hi)
            if token_id not in self.eos_token_ids:
                return token_id

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
        """Pending events as one batch with this engine's next sequence number (0, 1, 2, ...)."""
        events = self.pool.take_events()
        if not events:
            return None
        seq = self._kv_event_seq
        self._kv_event_seq += 1
        return seq, make_batch(events)

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_prefix_cache()

    # --- KV export / import (metadata only: a mocker holds no KV bytes) ---

    def export_kv(self, prompt_token_ids: list[int], cache_salt: str | None = None) -> KVBlockExport:
        """The prompt's leading cached blocks as an export with an empty payload (block_shape [0])."""
        seed = seed_for_salt(cache_salt)
        hashes = block_hashes(prompt_token_ids, self.block_size, seed)
        n = len(self.pool.find_cached_blocks(hashes))
        return KVBlockExport(self.block_size, "float32", [0], seed, hashes[:n],
                             list(prompt_token_ids[: n * self.block_size]), b"")

    def import_kv(self, export: KVBlockExport) -> int:
        """Publish an export's blocks to this prefix cache (hashes checked, bytes ignored); returns how many were new."""
        if export.block_size != self.block_size:
            raise ValueError(f"block_size {export.block_size} does not match this engine's {self.block_size}")
        if len(export.token_ids) != len(export.block_hashes) * export.block_size:
            raise ValueError("token_ids do not cover the exported blocks")
        if block_hashes(export.token_ids, export.block_size, export.hash_seed) != list(export.block_hashes):
            raise ValueError("block hashes do not match their tokens")
        present = self.pool.find_cached_blocks(list(export.block_hashes))
        num_present = len(present)
        new = len(export.block_hashes) - num_present
        if new == 0:
            return 0
        self.pool.touch(present)  # hold them so allocating the new ones cannot evict them
        if new > self.pool.num_free_blocks:
            self.pool.free(list(reversed(present)))
            raise ValueError(f"no room for {new} imported blocks ({self.pool.num_free_blocks} free)")
        blocks = self.pool.allocate(new)
        bs = self.block_size
        parent = export.block_hashes[num_present - 1] if num_present else None
        self.pool.cache_full_blocks(blocks, list(export.block_hashes[num_present:]),
                                    list(export.token_ids[num_present * bs:]), parent)
        self.pool.free(list(reversed(present + blocks)))
        return new
