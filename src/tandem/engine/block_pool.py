"""Paged KV block pool with a hash-keyed prefix cache and KV events.

Every KV block is either in use (``ref_count > 0``) or free. Free blocks sit in one LRU queue;
a free block may still carry the sequence hash of the tokens it holds, so a later request with
the same prefix can reuse it (a cache hit takes it back out of the queue). A cached block loses
its hash only when it is popped for reuse (lazy eviction), and that is when ``BlockRemoved`` is
reported. Hashes are the contract's sequence hashes from ``tandem.protocols.block_hash``.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from tandem.protocols.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent


class NoFreeBlocksError(RuntimeError):
    """Raised when more blocks are requested than the pool has free."""


@dataclass(eq=False)
class KVBlock:
    """One physical KV block. ``block_hash`` is set while the block is registered in the cache."""

    block_id: int
    ref_count: int = 0
    block_hash: int | None = None
    # What a tier below the pool needs to place the block in a chain (set while it is cached):
    parent_hash: int | None = None
    token_ids: tuple[int, ...] = ()
    hash_seed: int = 0
    num_hits: int = 0
    """Prefix-cache hits on this block since it was cached (the tiers' frequency filter)."""


class BlockPool:
    """Fixed set of KV blocks with ref counting, LRU free queue and prefix cache."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        enable_kv_events: bool = True,
    ) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        # Without a prefix cache nothing is ever stored, so there is nothing to report.
        self.enable_kv_events = enable_kv_events and enable_prefix_caching
        self.blocks: list[KVBlock] = [KVBlock(i) for i in range(num_blocks)]
        # Free queue, least recently freed first. An OrderedDict keyed by block_id is a C-level
        # doubly linked list plus a dict: O(1) pop from the LRU end, O(1) append at the MRU end
        # and O(1) removal from the middle (a cache hit on a free block), with no pointer
        # bookkeeping of our own.
        self._free: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._cached: dict[int, KVBlock] = {}  # sequence hash -> the block holding it
        self._events: list[KVEvent] = []
        self.num_queried_blocks = 0
        self.num_hit_blocks = 0
        self.on_evict: Callable[[list[KVBlock]], None] | None = None
        """Called with cached blocks about to lose their hash to reuse, while their KV is intact
        (the KV tiers copy them out)."""
        self.on_cached: Callable[[list[KVBlock]], None] | None = None
        """Called with blocks just registered in the cache (write-through offload)."""

    # ---- accounting -------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks with ref_count 0, including cached blocks that may still be evicted."""
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use (ref_count > 0)."""
        return 1.0 - len(self._free) / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks currently registered in the prefix cache (in use or free)."""
        return len(self._cached)

    @property
    def prefix_cache_hit_rate(self) -> float:
        """num_hit_blocks / num_queried_blocks, or 0.0 before any query."""
        if self.num_queried_blocks == 0:
            return 0.0
        return self.num_hit_blocks / self.num_queried_blocks

    # ---- prefix cache -----------------------------------------------------------------------

    def is_cached(self, block_hash: int) -> bool:
        """Whether a block with this sequence hash is in the prefix cache (no counters touched)."""
        return block_hash in self._cached

    def find_cached_blocks(self, block_hashes: list[int]) -> list[KVBlock]:
        """Longest prefix of ``block_hashes`` present in the cache (stops at the first miss).

        Does not change ref counts; call ``touch`` to keep the hits. Updates the hit counters
        (queried += len(block_hashes), hits += len(result)) only when prefix caching is on.
        """
        if not self.enable_prefix_caching:
            return []
        hits: list[KVBlock] = []
        for h in block_hashes:
            block = self._cached.get(h)
            if block is None:
                break
            hits.append(block)
        self.num_queried_blocks += len(block_hashes)
        self.num_hit_blocks += len(hits)
        return hits

    def touch(self, blocks: list[KVBlock]) -> None:
        """Take a reference on each cache hit; a block at ref 0 leaves the free queue."""
        for block in blocks:
            if block.ref_count == 0:
                del self._free[block.block_id]
            block.ref_count += 1
            if block.block_hash is not None:
                block.num_hits += 1

    def cache_full_blocks(
        self,
        blocks: list[KVBlock],
        block_hashes: list[int],
        token_ids: list[int],
        parent_block_hash: int | None,
        hash_seed: int = 0,
    ) -> None:
        """Register newly full blocks under their hashes (``blocks[i]`` <-> ``block_hashes[i]``).

        ``token_ids`` holds all their tokens, ``len(blocks) * block_size`` of them, and
        ``parent_block_hash`` is the hash of the block before ``blocks[0]`` (None at the start of
        a sequence). A hash already held by another block (a duplicate computed concurrently)
        keeps its existing mapping; this block stays unhashed and is not reported. A block that
        already carries this very hash is skipped. Reports the newly stored blocks as one
        ``BlockStored``; only if a skipped block sits between newly stored ones is the report
        split into one event per contiguous run, each chained from the hash just before it, so
        a router re-hashing ``token_ids`` from ``parent_block_hash`` gets the right hashes.
        ``hash_seed`` is the seed the hashes were made with (kept for the tiers).
        No-op when prefix caching is off.
        """
        if not self.enable_prefix_caching:
            return
        if len(blocks) != len(block_hashes):
            raise ValueError("blocks and block_hashes differ in length")
        if len(token_ids) != len(blocks) * self.block_size:
            raise ValueError("token_ids must hold exactly block_size tokens per block")
        run: list[int] = []  # indices of the current run of newly stored blocks
        newly_cached: list[KVBlock] = []
        parent = parent_block_hash
        bs = self.block_size
        for i, (block, h) in enumerate(zip(blocks, block_hashes)):
            if block.block_hash is not None:
                if block.block_hash != h:
                    raise ValueError(f"block {block.block_id} already cached under another hash")
                stored = False
            elif h in self._cached:
                stored = False  # duplicate: the first block to be cached keeps the hash
            else:
                block.block_hash = h
                block.parent_hash = block_hashes[i - 1] if i else parent_block_hash
                block.token_ids = tuple(token_ids[i * bs : (i + 1) * bs])
                block.hash_seed = hash_seed
                self._cached[h] = block
                newly_cached.append(block)
                stored = True
            if stored:
                run.append(i)
                continue
            if run:
                self._emit_stored(run, block_hashes, token_ids, parent)
                run = []
            parent = h
        if run:
            self._emit_stored(run, block_hashes, token_ids, parent)
        if newly_cached and self.on_cached is not None:
            self.on_cached(newly_cached)

    def _emit_stored(self, run: list[int], hashes: list[int], token_ids: list[int], parent: int | None) -> None:
        if not self.enable_kv_events:
            return
        bs = self.block_size
        self._events.append(
            BlockStored(
                block_hashes=[hashes[i] for i in run],
                parent_block_hash=parent,
                token_ids=list(token_ids[run[0] * bs : (run[-1] + 1) * bs]),
                block_size=bs,
            )
        )

    # ---- allocation -------------------------------------------------------------------------

    def allocate(self, num_blocks: int) -> list[KVBlock]:
        """Pop ``num_blocks`` free blocks, least recently freed first, each with ref_count 1.

        A popped block that still carries a hash is evicted from the cache first (one
        ``BlockRemoved`` per evicted block). Raises ``NoFreeBlocksError`` if too few are free.
        """
        if num_blocks < 0:
            raise ValueError("num_blocks must be >= 0")
        if num_blocks > len(self._free):
            raise NoFreeBlocksError(f"requested {num_blocks} blocks, {len(self._free)} free")
        out: list[KVBlock] = []
        evicting: list[KVBlock] = []
        for _ in range(num_blocks):
            _, block = self._free.popitem(last=False)
            if block.block_hash is not None:
                evicting.append(block)
            block.ref_count = 1
            out.append(block)
        if evicting and self.on_evict is not None:
            self.on_evict(evicting)  # they still carry their hash, tokens and hit count
        for block in evicting:
            self._evict(block)
        for block in out:
            block.num_hits = 0
        return out

    def _evict(self, block: KVBlock) -> None:
        h = block.block_hash
        assert h is not None and self._cached.get(h) is block
        del self._cached[h]
        block.block_hash = None
        if self.enable_kv_events:
            self._events.append(BlockRemoved(block_hashes=[h]))

    def free(self, blocks: list[KVBlock]) -> None:
        """Drop one reference from each block.

        Blocks reaching ref 0 join the MRU end of the free queue in the order given, so callers
        pass a request's blocks in reverse to have tail blocks evicted before shared prefixes.
        Cached blocks keep their hash until evicted. Raises ``ValueError`` (and changes nothing)
        if a block would drop below ref 0.
        """
        counts = Counter(b.block_id for b in blocks)
        for block in blocks:
            if block.ref_count < counts[block.block_id]:
                raise ValueError(f"block {block.block_id} freed more often than referenced")
        for block in blocks:
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block.block_id] = block

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash if no block is in use and report ``AllBlocksCleared``.

        Returns False and does nothing while any block has ref_count > 0.
        """
        if len(self._free) != self.num_blocks:
            return False
        for block in self._cached.values():
            block.block_hash = None
        self._cached.clear()
        if self.enable_kv_events:
            self._events.append(AllBlocksCleared())
        return True

    def take_events(self) -> list[KVEvent]:
        """Return and clear the events recorded since the last call, oldest first."""
        events, self._events = self._events, []
        return events
