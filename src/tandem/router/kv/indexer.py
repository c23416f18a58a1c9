"""Which worker holds which KV block: the KV-aware router's index.

The index is keyed by the router's *own* sequence hashes (``tandem.protocols.block_hash``) of each
``BlockStored`` event's ``token_ids``; the engine's block hashes are opaque ids, kept per worker
only to resolve a later ``parent_block_hash`` or ``BlockRemoved``. So the router indexes any
engine that speaks vLLM's event format, whatever hash function the engine uses.

Because a sequence hash chains the whole prefix, one flat map ``seq_hash -> workers`` says
exactly which workers hold a given prefix; no radix tree is needed. ``find_matches`` walks a
request's hashes in order, intersecting the candidate workers, and stops when none is left.
The workers holding a block are a bitmask (an ``int``, one bit per worker), not a ``set``: no
container object per block for the allocator and the cyclic GC to walk (with 1M blocks the GC
alone cost more per block than the dict updates), and intersections are single int operations
(benchmarks/kv_indexer_speed.py).

Limits, on purpose:

* Events carry no ``cache_salt`` (vLLM's ``BlockStored`` has none), so blocks are indexed with
  the default seed. A salted request (``sequence_hashes(..., cache_salt=...)``) then matches
  nothing: no false hits across tenants, no hits at all for salted tenants.
* ``lora_id`` is not mixed into the hash (``tandem.protocols.block_hash`` has no LoRA seed yet).
* Only the engine's own pool is indexed (``medium`` ``None`` or ``"GPU"``); events for other
  tiers (``"CPU"``, ``"DISK"``) are skipped and counted until tiered credit exists.
* Not thread-safe; the router applies events and matches on one event loop.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from tandem.kernels.block_hash import block_hashes, native_hashing
from tandem.protocols.block_hash import BLOCK_HASH_SEED, seed_for_salt
from tandem.protocols.kv_events import (
    MEDIUM_GPU,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEvent,
    KVEventBatch,
)

__all__ = ["IndexerStats", "KvIndexer"]


@dataclass
class IndexerStats:
    events_applied: int = 0  # events fully or partly applied
    blocks_stored: int = 0  # engine blocks added by BlockStored
    blocks_removed: int = 0  # engine blocks dropped by BlockRemoved
    unknown_parents: int = 0  # BlockStored events skipped: parent engine hash not indexed
    unknown_removals: int = 0  # engine hashes in BlockRemoved that were not indexed
    skipped_events: int = 0  # malformed, block-size mismatch, or another medium


class _WorkerBlocks:
    """One worker's blocks: engine hash -> router seq hash, and a ref count per seq hash.

    Two engine hashes can map to one router seq hash (e.g. an engine that salts its own hashes
    while events carry no salt), so a worker holds a seq hash while any of them is stored.
    ``bit`` is the worker's bit in the holder masks.
    """

    __slots__ = ("bit", "by_engine", "refs")

    def __init__(self, bit: int) -> None:
        self.bit = bit
        self.by_engine: dict[int, int] = {}
        self.refs: dict[int, int] = {}


class KvIndexer:
    """Maps the router's block sequence hashes to the workers holding them."""

    def __init__(self, block_size: int) -> None:
        if block_size <= 0:
            raise ValueError("block_size must be > 0")
        self.block_size = block_size
        native_hashing()  # build the C hashing loop now, not on the first routed request
        self.stats = IndexerStats()
        self._holders: dict[int, int] = {}  # seq hash -> bitmask of the workers holding it
        self._workers: dict[str, _WorkerBlocks] = {}
        self._by_index: list[str | None] = []  # bit index -> worker id (None: free for reuse)

    # ---- hashing requests -----------------------------------------------------------------------

    def sequence_hashes(self, token_ids: Sequence[int], cache_salt: str | None = None) -> list[int]:
        """The router's sequence hashes of a request's full blocks (same hashing as the index)."""
        return block_hashes(token_ids, self.block_size, seed_for_salt(cache_salt))

    # ---- events ---------------------------------------------------------------------------------

    def apply(self, worker_id: str, event: KVEvent) -> None:
        """Apply one KV event reported by ``worker_id``."""
        if isinstance(event, BlockStored):
            self._apply_stored(worker_id, event)
        elif isinstance(event, BlockRemoved):
            self._apply_removed(worker_id, event)
        elif isinstance(event, AllBlocksCleared):
            self._clear(worker_id)
            self._worker(worker_id)
            self.stats.events_applied += 1
        else:
            raise TypeError(f"not a KV event: {type(event).__name__}")

    def apply_batch(self, worker_id: str, batch: KVEventBatch | Iterable[KVEvent]) -> None:
        """Apply every event of a batch (or any iterable of events) in order."""
        events = batch.events if isinstance(batch, KVEventBatch) else batch
        for event in events:
            self.apply(worker_id, event)

    def _worker(self, worker_id: str) -> _WorkerBlocks:
        """The worker's blocks, registering the worker (and giving it a bit) on first sight."""
        blocks = self._workers.get(worker_id)
        if blocks is None:
            try:
                index = self._by_index.index(None)
                self._by_index[index] = worker_id
            except ValueError:
                index = len(self._by_index)
                self._by_index.append(worker_id)
            blocks = self._workers[worker_id] = _WorkerBlocks(1 << index)
        return blocks

    def _apply_stored(self, worker_id: str, event: BlockStored) -> None:
        n = len(event.block_hashes)
        if (
            event.medium not in (None, MEDIUM_GPU)
            or event.block_size != self.block_size
            or len(event.token_ids) != n * self.block_size
        ):
            self.stats.skipped_events += 1
            return
        blocks = self._worker(worker_id)
        by_engine, refs, holders, bit = blocks.by_engine, blocks.refs, self._holders, blocks.bit
        parent: int | None = None
        if event.parent_block_hash is not None:
            parent = by_engine.get(event.parent_block_hash)
            if parent is None:
                # The worker's sequence is out of sync with ours: its blocks cannot be placed.
                self.stats.unknown_parents += 1
                return
        seq_hashes = block_hashes(event.token_ids, self.block_size, BLOCK_HASH_SEED, parent)
        for engine_hash, seq_hash in zip(event.block_hashes, seq_hashes, strict=True):
            old = by_engine.get(engine_hash)
            if old is not None:
                if old == seq_hash:
                    continue  # a repeated report of the same block
                self._release(blocks, old)
            by_engine[engine_hash] = seq_hash
            count = refs.get(seq_hash, 0)
            refs[seq_hash] = count + 1
            if not count:
                holders[seq_hash] = holders.get(seq_hash, 0) | bit
        self.stats.blocks_stored += n
        self.stats.events_applied += 1

    def _apply_removed(self, worker_id: str, event: BlockRemoved) -> None:
        if event.medium not in (None, MEDIUM_GPU):
            self.stats.skipped_events += 1
            return
        blocks = self._worker(worker_id)
        for engine_hash in event.block_hashes:
            seq_hash = blocks.by_engine.pop(engine_hash, None)
            if seq_hash is None:
                self.stats.unknown_removals += 1
                continue
            self._release(blocks, seq_hash)
            self.stats.blocks_removed += 1
        self.stats.events_applied += 1

    def _release(self, blocks: _WorkerBlocks, seq_hash: int) -> None:
        count = blocks.refs[seq_hash] - 1
        if count:
            blocks.refs[seq_hash] = count
            return
        del blocks.refs[seq_hash]
        mask = self._holders[seq_hash] & ~blocks.bit
        if mask:
            self._holders[seq_hash] = mask
        else:
            del self._holders[seq_hash]

    def _clear(self, worker_id: str) -> None:
        blocks = self._workers.get(worker_id)
        if blocks is None:
            return
        holders, keep = self._holders, ~blocks.bit
        for seq_hash in blocks.refs:
            mask = holders[seq_hash] & keep
            if mask:
                holders[seq_hash] = mask
            else:
                del holders[seq_hash]
        blocks.by_engine.clear()
        blocks.refs.clear()

    # ---- workers --------------------------------------------------------------------------------

    def remove_worker(self, worker_id: str) -> None:
        """Forget a departed worker and every block it held (no-op for an unknown worker)."""
        self._clear(worker_id)
        blocks = self._workers.pop(worker_id, None)
        if blocks is not None:
            self._by_index[blocks.bit.bit_length() - 1] = None  # its bit is clear everywhere now

    def workers(self) -> set[str]:
        """Workers that have reported events and have not been removed."""
        return set(self._workers)

    def blocks_of(self, worker_id: str) -> int:
        """Distinct router blocks (sequence hashes) indexed for a worker."""
        blocks = self._workers.get(worker_id)
        return len(blocks.refs) if blocks is not None else 0

    def num_blocks(self) -> int:
        """Distinct sequence hashes held by at least one worker."""
        return len(self._holders)

    # ---- matching -------------------------------------------------------------------------------

    def find_matches(self, seq_hashes: Sequence[int]) -> dict[str, int]:
        """For each worker, how many leading blocks of the request it holds (≥ 1 only).

        A worker's count stops at the first block it lacks, even if it holds later ones.
        """
        holders = self._holders
        scores: dict[str, int] = {}
        candidates = 0  # bitmask of the workers holding every block so far
        depth = 0
        for depth, seq_hash in enumerate(seq_hashes):
            mask = holders.get(seq_hash, 0)
            if not depth:
                candidates = mask
            elif mask & candidates != candidates:
                self._score(candidates & ~mask, depth, scores)  # they stop here
                candidates &= mask
            if not candidates:
                break
        else:
            depth = len(seq_hashes)
        self._score(candidates, depth, scores)
        return scores

    def _score(self, mask: int, depth: int, scores: dict[str, int]) -> None:
        """``scores[worker] = depth`` for every worker in ``mask``."""
        by_index = self._by_index
        while mask:
            low = mask & -mask
            worker = by_index[low.bit_length() - 1]
            if worker is not None:
                scores[worker] = depth
            mask ^= low
