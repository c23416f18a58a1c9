"""What every engine built on Tandem's block pool and scheduler shares.

``EngineCore`` owns the pool, the KV cache manager, the scheduler and the request table, and does
the bookkeeping around a step: admitting and aborting requests, turning a sampled token into a
``RequestOutput`` (stop checks, freeing finished requests, counters), statistics, numbered KV
event batches, and publishing imported blocks to the prefix cache. Subclasses supply ``step()``
(the builtin engine runs the model; the mocker sleeps for a modeled time) and the KV payload of
export/import.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from tandem.engine.block_pool import BlockPool, KVBlock
from tandem.engine.kv_cache_manager import KVCacheManager, cdiv
from tandem.engine.outputs import RequestOutput
from tandem.engine.request import Request, RequestStatus
from tandem.engine.scheduler import Scheduler
from tandem.engine.served_engine import check_prompt
from tandem.kernels.block_hash import block_hashes
from tandem.protocols.block_hash import seed_for_salt
from tandem.protocols.endpoints import EngineStats, KvTierStats
from tandem.protocols.kv_events import KVEvent, KVEventBatch, make_batch
from tandem.protocols.kv_export import KVBlockExport
from tandem.protocols.sampling_params import SamplingParams


class TierStore(Protocol):
    """KV tiers below the pool as the engine core sees them (``KvTiers``, the mocker's
    ``ModeledTiers``)."""

    on_events: Callable[[], None] | None
    """Set by the engine loop: called when a tier records events off the engine thread."""

    @property
    def node_tier_name(self) -> str | None: ...

    def take_events(self) -> list[KVEvent]: ...

    def current_events(self) -> list[KVEvent]: ...

    def snapshot(self) -> KvTierStats: ...

    def clear(self) -> None: ...

    def close(self) -> None: ...


def check_stop(
    request: Request, token_id: int, eos_token_ids: frozenset[int], max_model_len: int
) -> RequestStatus | None:
    """How a request ends after appending ``token_id``, or None if it goes on."""
    params = request.sampling_params
    may_stop = request.num_output_tokens >= params.min_tokens
    if may_stop and ((token_id in eos_token_ids and not params.ignore_eos) or token_id in params.stop_token_ids):
        return RequestStatus.FINISHED_STOPPED
    if request.num_output_tokens >= params.max_tokens or request.num_tokens >= max_model_len:
        return RequestStatus.FINISHED_LENGTH
    return None


class EngineCore:
    def __init__(
        self,
        *,
        num_blocks: int,
        block_size: int,
        max_model_len: int,
        vocab_size: int,
        eos_token_ids: frozenset[int],
        max_num_batched_tokens: int,
        max_num_seqs: int,
        enable_prefix_caching: bool,
        enable_kv_events: bool,
    ) -> None:
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.pool = BlockPool(num_blocks, block_size, enable_prefix_caching, enable_kv_events)
        self.kv = KVCacheManager(self.pool, enable_prefix_caching)
        self.scheduler = Scheduler(self.kv, max_num_batched_tokens, max_num_seqs, max_model_len)
        self.requests: dict[str, Request] = {}
        self.tiers: TierStore | None = None
        """KV tiers below the pool (set by an engine that has them)."""
        self._prompt_tokens = self._cached_tokens = self._generated_tokens = self._steps = 0
        self._kv_event_seq = 0

    # --- hooks for subclasses ---

    def _on_added(self, request: Request) -> None:
        """Called once a request is admitted (e.g. to give it a sampling generator)."""

    def _on_removed(self, request_id: str) -> None:
        """Called when a request finishes or is aborted."""

    # --- requests ---

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        cache_salt: str | None = None,
        prompt_validated: bool = False,
    ) -> None:
        """Queue a request; raises ValueError for a bad prompt or a duplicate id.

        ``prompt_validated``: the caller already ran ``validate_prompt`` on this prompt."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already running")
        if not prompt_validated:
            self.validate_prompt(prompt_token_ids)
        request = Request(
            request_id,
            list(prompt_token_ids),
            params,
            self.block_size,
            cache_salt=cache_salt,
            eos_token_ids=self.eos_token_ids,
        )
        self._on_added(request)
        self.requests[request_id] = request
        self.scheduler.add_request(request)

    def validate_prompt(self, prompt_token_ids: list[int]) -> None:
        check_prompt(prompt_token_ids, self.vocab_size, self.max_model_len)
        if cdiv(len(prompt_token_ids) + 1, self.block_size) > self.pool.num_blocks:
            raise ValueError(
                f"prompt of {len(prompt_token_ids)} tokens cannot fit in a KV cache of {self.pool.num_blocks} blocks"
            )

    def abort_request(self, request_id: str) -> bool:
        """Stop a request and free its blocks; False if it is unknown or already finished."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return False
        self._on_removed(request_id)
        self.scheduler.finish_request(request, RequestStatus.FINISHED_ABORTED)
        return True

    @property
    def num_steps(self) -> int:
        """Non-empty steps run since start."""
        return self._steps

    @property
    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished

    def step(self) -> list[RequestOutput]:
        raise NotImplementedError

    def _emit_token(self, request: Request, token_id: int) -> RequestOutput:
        """Append a sampled token, count it, apply the stop rules, free the request if it ended."""
        request.append_output_token(token_id)
        self._generated_tokens += 1
        if request.num_output_tokens == 1:
            self._prompt_tokens += request.num_prompt_tokens
            self._cached_tokens += max(0, request.num_cached_tokens)
        output = RequestOutput(
            request.request_id,
            [token_id],
            num_prompt_tokens=request.num_prompt_tokens,
            num_cached_tokens=max(0, request.num_cached_tokens),
            num_output_tokens=request.num_output_tokens,
        )
        status = check_stop(request, token_id, self.eos_token_ids, self.max_model_len)
        if status is not None:
            output.finished, output.finish_reason = True, status.value
            if status is RequestStatus.FINISHED_STOPPED:
                output.stop_token_id = token_id
            self.scheduler.finish_request(request, status)
            del self.requests[request.request_id]
            self._on_removed(request.request_id)
        return output

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
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_usage=self.pool.usage,
            num_total_blocks=self.pool.num_blocks,
            num_free_blocks=self.pool.num_free_blocks,
            prefix_cache_hit_rate=self.pool.prefix_cache_hit_rate,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens_total=self._prompt_tokens,
            cached_prompt_tokens_total=self._cached_tokens,
            generation_tokens_total=self._generated_tokens,
            steps_total=self._steps,
            tiers=self.tiers.snapshot() if self.tiers is not None else None,
        )

    def take_kv_events(self) -> list[KVEvent]:
        """The tiers' events since the last call, then the block pool's, in order (no sequence
        number). Tiers first: a block the pool evicts into a tier is reported stored in the tier
        before it is reported removed from the pool, so a router still knows its parent (often a
        pool block evicted in the same step) when it places it."""
        events = self.tiers.take_events() if self.tiers is not None else []  # always drained
        if not self.pool.enable_kv_events:
            events = []
        events.extend(self.pool.take_events())
        return events

    def take_kv_event_batch(self) -> tuple[int, KVEventBatch] | None:
        """Pending events as one batch with this engine's next sequence number (0, 1, 2, ...).

        The number is what a publisher puts on the wire, so a subscriber can detect a gap.
        None when nothing happened since the last batch.
        """
        events = self.take_kv_events()
        if not events:
            return None
        seq = self._kv_event_seq
        self._kv_event_seq += 1
        return seq, make_batch(events)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block, the private tiers' included; False while blocks are in use."""
        if not self.pool.reset_prefix_cache():
            return False
        if self.tiers is not None:
            self.tiers.clear()
        return True

    def current_tier_events(self) -> list[KVEvent]:
        """What the tiers below the pool hold now, as BlockStored events (for a dump)."""
        return self.tiers.current_events() if self.tiers is not None else []

    def close(self) -> None:
        """Release what the engine holds outside its process memory (tier threads and files)."""
        if self.tiers is not None:
            self.tiers.close()

    # --- KV export / import: the block bookkeeping (subclasses move the bytes) ---

    def export_kv(self, prompt_token_ids: list[int], cache_salt: str | None = None) -> KVBlockExport:
        """The cached KV of the prompt's leading full blocks (as many as the cache holds)."""
        raise NotImplementedError(f"{type(self).__name__} does not export KV")

    def import_kv(self, export: KVBlockExport) -> int:
        """Write exported blocks into this engine's prefix cache; returns how many were new."""
        raise NotImplementedError(f"{type(self).__name__} does not import KV")

    def modeled_transfer_s(self, num_blocks: int) -> float:
        """Extra wait a KV pull of ``num_blocks`` should cost: 0 for an engine whose pulls move
        real bytes (the mocker models one)."""
        return 0.0

    def num_cached_prompt_blocks(self, prompt_token_ids: list[int], cache_salt: str | None = None) -> int:
        """Leading full blocks of the prompt in the prefix cache (hit counters untouched)."""
        count = 0
        for block_hash in block_hashes(prompt_token_ids, self.block_size, seed_for_salt(cache_salt)):
            if not self.pool.is_cached(block_hash):
                break
            count += 1
        return count

    def _cached_prefix(
        self, prompt_token_ids: list[int], cache_salt: str | None
    ) -> tuple[int, list[int], list[KVBlock]]:
        """(hash seed, the prompt's full-block hashes, the cached blocks of its leading run)."""
        seed = seed_for_salt(cache_salt)
        hashes = block_hashes(prompt_token_ids, self.block_size, seed)
        return seed, hashes, self.pool.find_cached_blocks(hashes)

    def _import_blocks(
        self,
        hashes: list[int],
        token_ids: list[int],
        write: Callable[[list[int], int], None],
        parent_hash: int | None = None,
        seed: int = 0,
    ) -> int:
        """Publish blocks to the prefix cache; ``write(block_ids, first)`` fills the new blocks with
        the payload of blocks ``first..``. Returns how many were new (cached blocks are skipped).
        ``parent_hash``: the run continues that cached block (its prefix must be here already, or
        the imported blocks could never be reached by a prompt)."""
        if parent_hash is not None and not self.pool.is_cached(parent_hash):
            raise ValueError(
                "the imported blocks continue a block this engine does not hold: import their prefix first"
            )
        present = self.pool.find_cached_blocks(hashes)
        num_present = len(present)
        new = len(hashes) - num_present
        if new == 0:
            return 0
        # Hold the blocks already present so allocating the new ones cannot evict them.
        self.pool.touch(present)
        if new > self.pool.num_free_blocks:
            self.pool.free(list(reversed(present)))
            raise ValueError(f"no room for {new} imported blocks ({self.pool.num_free_blocks} free)")
        blocks = self.pool.allocate(new)
        write([b.block_id for b in blocks], num_present)
        bs = self.block_size
        parent = hashes[num_present - 1] if num_present else parent_hash
        self.pool.cache_full_blocks(blocks, hashes[num_present:], token_ids[num_present * bs :], parent, seed)
        self.pool.free(list(reversed(present + blocks)))
        return new

    def _check_import_block_size(self, block_size: int) -> None:
        if block_size != self.block_size:
            raise ValueError(f"block_size {block_size} does not match this engine's {self.block_size}")
