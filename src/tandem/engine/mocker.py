"""Mocker engine (``--engine mocker``): the builtin engine's block pool and scheduler with a
modeled step time in place of a model.

One step = schedule → model the step's time → sleep for it (÷ ``speedup_ratio``) → advance the
scheduler → append one plausible token per due request → stop checks → outputs. The block pool,
prefix cache, preemption, KV events and statistics are the real ones (``BlockPool``,
``KVCacheManager``, ``Scheduler``, ``Request`` through ``EngineCore``, as ``LLMEngine`` uses them), so a router or
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
* KV transfer (disaggregated serving): ``transfer_ms(N) = N · kv_bytes_per_token ÷
  kv_transfer_bandwidth`` for the N tokens of the blocks a decode worker pulls (only those it
  lacks); the decode worker waits that long before importing them (Dynamo's mocker sleeps the
  same quantity on the prefill side, for the whole prompt).

Sampled tokens are drawn uniformly from ``[first_token_id, vocab_size)`` by a per-request
``random.Random`` (seeded from ``SamplingParams.seed`` or from ``MockerConfig.seed`` and the
request id), skipping EOS — so ``max_tokens`` (or a stop token id drawn by chance, or the context
length) ends a request. Request bookkeeping, stop rules, stats and events come from ``EngineCore``, shared with the
builtin engine.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from dataclasses import dataclass, field

from tandem.engine.block_pool import KVBlock
from tandem.engine.engine_core import EngineCore
from tandem.engine.kv_tiers.block_meta import block_meta
from tandem.engine.kv_tiers.modeled import ModeledTierConfig, ModeledTiers
from tandem.engine.outputs import RequestOutput
from tandem.engine.request import Request
from tandem.engine.scheduler import SchedulerOutput
from tandem.kernels.block_hash import block_hashes
from tandem.protocols.block_hash import DEFAULT_BLOCK_SIZE
from tandem.protocols.kv_export import KVBlockExport, verify_block_hashes

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
    kv_bytes_per_token: int = 131072
    """KV bytes one token occupies, for the modeled transfer time (layers·2·kv_heads·head_dim·dtype
    bytes; default: Llama-3.1-8B in bf16, 32·2·8·128·2)."""
    kv_transfer_bandwidth_gbs: float = 64.0
    """Modeled prefill → decode KV transfer bandwidth in GB/s (Dynamo's mocker docs use 64);
    0 = transfers take no time."""
    seed: int = 0
    """Base seed of the per-request token RNGs for requests that bring no seed."""
    tiers: ModeledTierConfig = field(default_factory=ModeledTierConfig)
    """Modeled host and disk KV tiers below the pool (none by default); block bytes are
    ``kv_bytes_per_token · block_size``."""

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be positive, got {self.num_kv_blocks}")
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be positive")
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}")
        if self.kv_bytes_per_token < 0 or self.kv_transfer_bandwidth_gbs < 0:
            raise ValueError("kv_bytes_per_token and kv_transfer_bandwidth_gbs must be non-negative")
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

    def transfer_ms(self, num_tokens: int) -> float:
        """Modeled time of moving ``num_tokens`` tokens' KV from a prefill to a decode worker."""
        if self.kv_transfer_bandwidth_gbs <= 0:
            return 0.0
        return num_tokens * self.kv_bytes_per_token / (self.kv_transfer_bandwidth_gbs * 1e9) * 1000.0

    def step_ms(self, num_prefill_tokens: int, num_decode_rows: int, kv_usage: float) -> float:
        """A step's modeled time: prefill part + decode part (each only when present)."""
        ms = self.prefill_ms(num_prefill_tokens)
        if num_decode_rows > 0:
            ms += self.decode_ms(kv_usage)
        return ms


def _request_seed(base_seed: int, request_id: str) -> int:
    digest = hashlib.blake2b(f"{base_seed}:{request_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class MockerEngine(EngineCore):
    """``LLMEngine``'s interface over a real scheduler and block pool, with modeled step times."""

    def __init__(self, config: MockerConfig | None = None) -> None:
        config = config or MockerConfig()
        self.config = config
        super().__init__(
            num_blocks=config.num_kv_blocks,
            block_size=config.block_size,
            max_model_len=config.max_model_len,
            vocab_size=config.vocab_size,
            eos_token_ids=frozenset([config.eos_token_id]),
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_num_seqs=config.max_num_seqs,
            enable_prefix_caching=config.enable_prefix_caching,
            enable_kv_events=config.enable_kv_events,
        )
        self._rngs: dict[str, random.Random] = {}
        self.last_step_ms = 0.0
        """Modeled time of the latest non-empty step (before the speedup ratio)."""
        self.total_modeled_ms = 0.0
        """Sum of every step's modeled time since start (before the speedup ratio)."""
        self.total_slept_s = 0.0
        """Wall time actually spent sleeping, since start."""
        self.last_step_prefill_tokens = 0
        self.last_step_decode_rows = 0
        self.modeled_tiers: ModeledTiers | None = None
        if config.tiers.enabled:
            if not config.enable_prefix_caching:
                raise ValueError("KV tiers need prefix caching (they are keyed by its block hashes)")
            tiers = ModeledTiers(config.tiers, config.block_size, config.kv_bytes_per_token * config.block_size)
            self.tiers = self.modeled_tiers = self.scheduler.tiers = tiers
            self.pool.on_evict = self._offload
            if config.tiers.offload_policy == "write-through":
                self.pool.on_cached = self._offload

    def _offload(self, blocks: list[KVBlock]) -> None:
        assert self.modeled_tiers is not None
        self.modeled_tiers.offload([block_meta(b) for b in blocks])

    def _on_added(self, request: Request) -> None:
        seed = request.sampling_params.seed
        self._rngs[request.request_id] = random.Random(
            seed if seed is not None else _request_seed(self.config.seed, request.request_id)
        )

    def _on_removed(self, request_id: str) -> None:
        self._rngs.pop(request_id, None)

    # --- the step ---

    def modeled_step_ms(self, sched: SchedulerOutput) -> tuple[float, int, int]:
        """(modeled ms, uncached prefill tokens, decode rows) of a scheduled, not yet finished step."""
        prefill_tokens = decode_rows = 0
        for chunk in sched.chunks:
            request = chunk.request
            is_decode = (
                chunk.num_tokens == 1
                and request.num_output_tokens > 0
                and request.num_computed_tokens == request.num_tokens - 1
            )
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
        if self.modeled_tiers is not None:
            ms += self.modeled_tiers.take_onboard_ms()  # the tier blocks this step's admissions loaded
        self.last_step_ms = ms
        self.total_modeled_ms += ms
        self._sleep_until(start, ms)
        due = self.scheduler.finish_step(sched)
        self._steps += 1
        return [self._emit_token(request, self._sample(request)) for request in due]

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

    # --- KV export / import (metadata only: a mocker holds no KV bytes) ---

    def modeled_transfer_s(self, num_blocks: int) -> float:
        """Wall seconds a pull of ``num_blocks`` blocks should take (the decode worker sleeps them:
        the real pull moves no bytes). Scaled by the speedup ratio like step times; 0 = no delay."""
        ratio = self.config.speedup_ratio
        if ratio <= 0:
            return 0.0
        return self.config.transfer_ms(num_blocks * self.block_size) / 1000.0 / ratio

    def export_kv(self, prompt_token_ids: list[int], cache_salt: str | None = None) -> KVBlockExport:
        """The prompt's leading cached blocks as an export with an empty payload (block_shape [0])."""
        seed, hashes, blocks = self._cached_prefix(prompt_token_ids, cache_salt)
        n = len(blocks)
        return KVBlockExport(
            self.block_size, "float32", [0], seed, hashes[:n], list(prompt_token_ids[: n * self.block_size]), b""
        )

    def import_kv(self, export: KVBlockExport) -> int:
        """Publish an export's blocks to this prefix cache (hashes checked, bytes ignored); returns how many were new."""
        self._check_import_block_size(export.block_size)
        verify_block_hashes(export, block_hashes)
        return self._import_blocks(
            list(export.block_hashes), list(export.token_ids), lambda block_ids, first: None, export.parent_hash
        )
