"""Which worker holds which KV block, in which tier: the KV-aware router's index.

The index is keyed by the router's *own* sequence hashes (``tandem.protocols.block_hash``) of each
``BlockStored`` event's ``token_ids``; the engine's block hashes are opaque ids, kept per holder
and tier only to resolve a later ``parent_block_hash`` or ``BlockRemoved``. So the router indexes
any engine that speaks vLLM's event format, whatever hash function the engine uses.

Because a sequence hash chains the whole prefix, one flat map ``seq_hash -> workers`` per tier
says exactly which workers hold a given prefix there; no radix tree is needed. The workers
holding a block are a bitmask (an ``int``, one bit per worker), not a ``set``: no container object
per block for the allocator and the cyclic GC to walk (with 1M blocks the GC alone cost more per
block than the dict updates), and intersections are single int operations
(benchmarks/kv_indexer_speed.py).

Tiers (``router/kv/tiers.py``): an event's ``medium`` names G1 (device: the engine's pool), G2
(host memory) or G3 (disk). Each (worker, tier) keeps its own engine-hash map and ref counts, so a
block can be held in several tiers at once (e.g. G1 and a write-through copy in G2); a
``BlockStored``'s parent is looked up in the event's tier first, then the worker's other tiers (a
block offloaded to host memory often has its parent still in G1). ``BlockRemoved`` removes from the
tier its medium names; ``AllBlocksCleared`` clears every tier of the worker.

A node-wide host tier (``set_node_tier``: the workers of one machine sharing one host segment,
``WorkerCard.kv_node_tier``) is a pseudo-holder: host events of its workers apply to it, any of
them may store a block and another report its removal, and a block it holds counts as host-held
by every member. A member's ``AllBlocksCleared`` (or a dump, which starts with one) leaves it alone;
it goes when its last member leaves. A removal that the router missed in a gap stays in it until
the block is stored and removed again (a dump cannot say what is gone from a shared tier).

Matching: ``find_matches`` gives each worker's depth, the leading run of the request's blocks it
holds in any tier; ``find_tiered_matches`` splits it by the best tier holding each block. With no
host or disk entry indexed at all both take the device-only walk (one lookup and one AND per
block); otherwise ``tiers.match_tiers`` walks the three masks, skipping blocks whose masks repeat
the previous block's (they mostly do) and tracking which workers count in which tier as bitmask
spans, so per-worker work happens once per request, not per block or run.

Limits, on purpose:

* Events carry no ``cache_salt`` (vLLM's ``BlockStored`` has none), so blocks are indexed with
  the default seed. A salted request (``sequence_hashes(..., cache_salt=...)``) then matches
  nothing: no false hits across tenants, no hits at all for salted tenants.
* ``lora_id`` is not mixed into the hash (``tandem.protocols.block_hash`` has no LoRA seed yet).
* Events with a medium that names no tier are skipped and counted.
* Not thread-safe; the router applies events and matches on one event loop.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from tandem.kernels.block_hash import block_hashes, native_hashing
from tandem.protocols.block_hash import BLOCK_HASH_SEED, seed_for_salt
from tandem.protocols.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent, KVEventBatch
from tandem.router.kv.tiers import (
    HOST,
    MEDIUM_TIERS,
    NodeTier,
    Tier,
    TierBlocks,
    TieredMatch,
    WorkerHolder,
    match_tiers,
    tier_index,
)

__all__ = ["IndexerStats", "KvIndexer", "Tier", "TieredMatch"]


@dataclass
class IndexerStats:
    events_applied: int = 0  # events fully or partly applied
    blocks_stored: int = 0  # engine blocks added by BlockStored
    blocks_removed: int = 0  # engine blocks dropped by BlockRemoved
    unknown_parents: int = 0  # BlockStored events skipped: parent engine hash not indexed
    unknown_removals: int = 0  # engine hashes in BlockRemoved that were not indexed
    skipped_events: int = 0  # malformed, block-size mismatch, or a medium that names no tier


class KvIndexer:
    """Maps the router's block sequence hashes to the workers holding them, per tier."""

    def __init__(self, block_size: int) -> None:
        if block_size <= 0:
            raise ValueError("block_size must be > 0")
        self.block_size = block_size
        native_hashing()  # build the C hashing loop now, not on the first routed request
        self.stats = IndexerStats()
        self._holders: dict[int, int] = {}  # seq hash -> bitmask of the workers holding it in G1
        self._host: dict[int, int] = {}  # the same in G2 (node-tier bits included)
        self._disk: dict[int, int] = {}  # the same in G3
        self._workers: dict[str, WorkerHolder] = {}
        self._nodes: dict[str, NodeTier] = {}
        self._node_by_bit: dict[int, NodeTier] = {}
        self._node_bits = 0  # the bits of node tiers (never in G1 or G3 masks)
        self._used_bits = 0
        self._by_index: list[str | None] = []  # bit index -> worker id (None: a node tier, or free)

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
            self._clear(self._worker(worker_id))
            self.stats.events_applied += 1
        else:
            raise TypeError(f"not a KV event: {type(event).__name__}")

    def apply_batch(self, worker_id: str, batch: KVEventBatch | Iterable[KVEvent]) -> None:
        """Apply every event of a batch (or any iterable of events) in order."""
        events = batch.events if isinstance(batch, KVEventBatch) else batch
        for event in events:
            self.apply(worker_id, event)

    def _apply_stored(self, worker_id: str, event: BlockStored) -> None:
        n = len(event.block_hashes)
        tier = MEDIUM_TIERS.get(event.medium)
        if tier is None:
            tier = tier_index(event.medium)
        if tier is None or event.block_size != self.block_size or len(event.token_ids) != n * self.block_size:
            self.stats.skipped_events += 1
            return
        holder = self._worker(worker_id)
        blocks = holder.tiers[tier] if tier != HOST or holder.node is None else holder.node.blocks
        parent: int | None = None
        if event.parent_block_hash is not None:
            parent = blocks.by_engine.get(event.parent_block_hash)  # the event's own tier: mostly there
            if parent is None:
                parent = holder.resolve_parent(blocks, event.parent_block_hash)
            if parent is None:
                # The worker's sequence is out of sync with ours: its blocks cannot be placed.
                self.stats.unknown_parents += 1
                return
        blocks.store(event.block_hashes, block_hashes(event.token_ids, self.block_size, BLOCK_HASH_SEED, parent))
        self.stats.blocks_stored += n
        self.stats.events_applied += 1

    def _apply_removed(self, worker_id: str, event: BlockRemoved) -> None:
        tier = tier_index(event.medium)
        if tier is None:
            self.stats.skipped_events += 1
            return
        blocks = self._worker(worker_id).target(tier)
        for engine_hash in event.block_hashes:
            seq_hash = blocks.by_engine.pop(engine_hash, None)
            if seq_hash is None:
                self.stats.unknown_removals += 1
                continue
            blocks.release(seq_hash)
            self.stats.blocks_removed += 1
        self.stats.events_applied += 1

    @staticmethod
    def _clear(holder: WorkerHolder) -> None:
        """Drop the worker's blocks in all of its own tiers (not its node tier's)."""
        for blocks in holder.tiers:
            if blocks.refs:
                blocks.clear()

    # ---- workers and node tiers -----------------------------------------------------------------

    def _take_bit(self) -> int:
        used = self._used_bits
        bit = ~used & (used + 1)  # the lowest free bit
        self._used_bits = used | bit
        index = bit.bit_length() - 1
        if index == len(self._by_index):
            self._by_index.append(None)
        return bit

    def _free_bit(self, bit: int) -> None:
        self._used_bits &= ~bit
        self._by_index[bit.bit_length() - 1] = None

    def _worker(self, worker_id: str) -> WorkerHolder:
        """The worker's holder, registering the worker (and giving it a bit) on first sight."""
        holder = self._workers.get(worker_id)
        if holder is None:
            bit = self._take_bit()
            self._by_index[bit.bit_length() - 1] = worker_id
            holder = self._workers[worker_id] = WorkerHolder(bit, (self._holders, self._host, self._disk))
        return holder

    def set_node_tier(self, worker_id: str, node_tier: str | None) -> None:
        """Say which node-wide host tier ``worker_id`` shares (its card's ``kv_node_tier``); None:
        its host tier is its own. Host events the worker reports from now on apply to that tier,
        and every block the tier holds counts as host-held by the worker."""
        holder = self._workers.get(worker_id)
        if holder is None:
            if node_tier is None:
                return
            holder = self._worker(worker_id)
        if holder.node is not None:
            if holder.node.name == node_tier:
                return
            self._leave_node(holder)
        if node_tier is not None:
            node = self._nodes.get(node_tier)
            if node is None:
                bit = self._take_bit()
                node = self._nodes[node_tier] = self._node_by_bit[bit] = NodeTier(
                    node_tier, TierBlocks(bit, self._host)
                )
                self._node_bits |= bit
            node.members |= holder.bit
            holder.node = node

    def _leave_node(self, holder: WorkerHolder) -> None:
        node = holder.node
        assert node is not None
        holder.node = None
        node.members &= ~holder.bit
        if node.members:
            return
        node.blocks.clear()  # its last member left
        bit = node.blocks.bit
        del self._nodes[node.name], self._node_by_bit[bit]
        self._node_bits &= ~bit
        self._free_bit(bit)

    def node_tier_of(self, worker_id: str) -> str | None:
        """The node-wide host tier the worker shares (``set_node_tier``), None if none."""
        holder = self._workers.get(worker_id)
        return holder.node.name if holder is not None and holder.node is not None else None

    def remove_worker(self, worker_id: str) -> None:
        """Forget a departed worker and every block it held (no-op for an unknown worker); its
        node tier goes too when it was the last member."""
        holder = self._workers.pop(worker_id, None)
        if holder is None:
            return
        self._clear(holder)
        if holder.node is not None:
            self._leave_node(holder)
        self._free_bit(holder.bit)  # its bit is clear everywhere now

    def workers(self) -> set[str]:
        """Workers that have reported events (or joined a node tier) and have not been removed."""
        return set(self._workers)

    def blocks_of(self, worker_id: str, tier: Tier | None = None) -> int:
        """Distinct router blocks (sequence hashes) indexed for a worker in ``tier`` (host: its
        node tier's when it has one), or in any of its own tiers (None; a node tier not counted)."""
        holder = self._workers.get(worker_id)
        if holder is None:
            return 0
        if tier is not None:
            return len(holder.target(tier).refs)
        device, host, disk = (blocks.refs for blocks in holder.tiers)
        if not host and not disk:
            return len(device)
        return len(device.keys() | host.keys() | disk.keys())

    def num_blocks(self, tier: Tier | None = None) -> int:
        """Distinct sequence hashes held in ``tier``, or in any tier (None), by at least one holder."""
        masks = (self._holders, self._host, self._disk)
        if tier is not None:
            return len(masks[tier])
        if not self._host and not self._disk:
            return len(self._holders)
        return len(self._holders.keys() | self._host.keys() | self._disk.keys())

    def has_lower_tiers(self) -> bool:
        """Whether any block is indexed in host memory or on disk (else matches are device-only)."""
        return bool(self._host) or bool(self._disk)

    # ---- matching -------------------------------------------------------------------------------

    def find_matches(self, seq_hashes: Sequence[int]) -> dict[str, int]:
        """For each worker, how many leading blocks of the request it holds in any tier (≥ 1 only).

        A worker's count stops at the first block it lacks, even if it holds later ones.
        """
        if self._host or self._disk:
            return {worker: match.depth for worker, match in self.find_tiered_matches(seq_hashes).items()}
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

    def find_tiered_matches(self, seq_hashes: Sequence[int]) -> dict[str, TieredMatch]:
        """For each worker with a match (≥ 1 block): its leading blocks held in any tier, counted
        by the best tier holding each (device, then host, node tier included, then disk)."""
        if not self._host and not self._disk:
            made: dict[int, TieredMatch] = {}  # one per depth, shared by the workers at that depth
            matches = {}
            for worker, depth in self.find_matches(seq_hashes).items():
                match = made.get(depth)
                if match is None:
                    match = made[depth] = TieredMatch(depth, 0, 0)
                matches[worker] = match
            return matches
        masks = (self._holders, self._host, self._disk)
        return match_tiers(seq_hashes, masks, self._node_bits, self._expand, self._by_index)

    def _expand(self, mask: int) -> int:
        """A host mask with each node tier's bit replaced by its members' bits."""
        nodes = mask & self._node_bits
        mask ^= nodes
        while nodes:
            low = nodes & -nodes
            mask |= self._node_by_bit[low].members
            nodes ^= low
        return mask
