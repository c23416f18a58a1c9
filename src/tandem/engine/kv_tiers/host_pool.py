"""G2: KV blocks in host memory, keyed by sequence hash, deduplicated, evicted least recently
used first. Private to one engine or shared by the workers of a node (``host_segment``).

Writers reserve a slot under the lock (state WRITING, owner pid, a new version), copy the bytes
outside it and mark the slot READY under the lock again. Readers look slots up under the lock,
copy outside it, and keep a block only if its slot still has the version they saw: a block
another worker evicted meanwhile is a miss, never wrong bytes. Nothing holds a slot across
calls, so a dead worker can leak nothing but a WRITING slot, which is reclaimed.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field

import numpy as np
import psutil
import torch

from tandem.engine.kv_tiers.block_meta import BlockMeta
from tandem.engine.kv_tiers.host_segment import FREE, READY, WRITING, HostSegment, SlotArrays


@dataclass
class StoreResult:
    stored: list[BlockMeta] = field(default_factory=list)
    """Blocks newly written (not those already present)."""
    evicted: list[BlockMeta] = field(default_factory=list)
    """Blocks pushed out to make room."""
    evicted_data: list[torch.Tensor] = field(default_factory=list)
    """The bytes of the evicted blocks that pass ``keep_evicted`` (for the disk tier), in order."""
    kept_evicted: list[BlockMeta] = field(default_factory=list)
    """The evicted blocks whose bytes are in ``evicted_data``."""
    dropped: int = 0
    """Blocks not stored because every slot was being written by someone."""


class HostPool:
    def __init__(self, segment: HostSegment, block_shape: list[int], dtype: torch.dtype) -> None:
        self.segment = segment
        self.num_slots = segment.num_slots
        self.block_shape = list(block_shape)
        self.block_size = int(segment.arrays.header["block_size"][0])
        self.pid = os.getpid()
        with warnings.catch_warnings():  # torch warns about non-writable buffers; ours is writable
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.frombuffer(segment.arrays.data, dtype=torch.uint8)
        self.data = raw.view(dtype).view(self.num_slots, *self.block_shape)
        self._slot_of: dict[int, int] = {}  # memo, re-checked against the table on every use

    @property
    def shared(self) -> bool:
        return self.segment.shared

    def num_used(self) -> int:
        return int(np.count_nonzero(self.segment.arrays.state == READY))

    # ---- lookup -------------------------------------------------------------------------------

    def _find(self, t: SlotArrays, block_hash: int, states: tuple[int, ...] = (READY,)) -> int:
        """The slot holding ``block_hash`` in one of ``states``, or -1 (call under the lock)."""
        slot = self._slot_of.get(block_hash, -1)
        if slot >= 0 and int(t.hash[slot]) == block_hash and int(t.state[slot]) in states:
            return slot
        if not self.shared and slot < 0:
            return -1  # a private table is written only by us: the memo is complete
        found = np.flatnonzero(t.hash == np.uint64(block_hash))
        for candidate in found:
            if int(t.state[candidate]) in states:
                self._slot_of[block_hash] = int(candidate)
                return int(candidate)
        self._slot_of.pop(block_hash, None)
        return -1

    def match(self, hashes: list[int]) -> int:
        """How many leading ``hashes`` this tier holds."""
        with self.segment.locked() as t:
            for count, block_hash in enumerate(hashes):
                if self._find(t, block_hash) < 0:
                    return count
        return len(hashes)

    def contains(self, block_hash: int) -> bool:
        with self.segment.locked() as t:
            return self._find(t, block_hash) >= 0

    def note_uses(self, metas: list[BlockMeta]) -> list[bool]:
        """For each block: whether this tier holds it. A held block counts a use (its frequency
        becomes at least the given one, and it turns most recently used)."""
        held: list[bool] = []
        with self.segment.locked() as t:
            for meta in metas:
                slot = self._find(t, meta.block_hash, (READY, WRITING))
                if slot >= 0:
                    t.frequency[slot] = max(int(t.frequency[slot]), meta.frequency)
                    self._touch(t, slot)
                held.append(slot >= 0)
        return held

    # ---- read ---------------------------------------------------------------------------------

    def read(self, hashes: list[int]) -> tuple[list[BlockMeta], torch.Tensor]:
        """The leading run of ``hashes`` this tier can deliver: their metadata and bytes
        ``[n, *block_shape]``. Counts each as a use (LRU and frequency)."""
        slots: list[int] = []
        versions: list[int] = []
        metas: list[BlockMeta] = []
        with self.segment.locked() as t:
            for block_hash in hashes:
                slot = self._find(t, block_hash)
                if slot < 0:
                    break
                slots.append(slot)
                versions.append(int(t.version[slot]))
                t.frequency[slot] += 1
                self._touch(t, slot)
                metas.append(_meta(t, slot))
        if not slots:
            return [], self.data[:0].clone()
        data = self.data.index_select(0, torch.tensor(slots, dtype=torch.long))
        with self.segment.locked() as t:
            for i, (slot, version) in enumerate(zip(slots, versions)):
                if int(t.version[slot]) != version or int(t.state[slot]) != READY:
                    return metas[:i], data[:i]  # overwritten while we copied: the rest is a miss
        return metas, data

    # ---- store --------------------------------------------------------------------------------

    def store(self, metas: list[BlockMeta], data: torch.Tensor, keep_evicted_min_frequency: int = 0) -> StoreResult:
        """Write blocks (``data[i]`` holds ``metas[i]``); blocks already here only count a use.
        Evicted blocks with frequency ≥ ``keep_evicted_min_frequency`` (0: none) come back with
        their bytes, for the tier below."""
        result = StoreResult()
        reserved: list[tuple[int, int, int]] = []  # (slot, version, index into metas)
        victims: list[tuple[int, BlockMeta]] = []
        with self.segment.locked() as t:
            taken: set[int] = set()
            for i, meta in enumerate(metas):
                slot = self._find(t, meta.block_hash, (READY, WRITING))
                if slot >= 0:
                    t.frequency[slot] = max(int(t.frequency[slot]), meta.frequency)
                    self._touch(t, slot)
                    continue
                slot = self._free_slot(t, taken)
                if slot < 0:
                    result.dropped += 1
                    continue
                if int(t.state[slot]) == READY:
                    victim = _meta(t, slot)
                    victims.append((slot, victim))
                    result.evicted.append(victim)
                    self._slot_of.pop(victim.block_hash, None)
                taken.add(slot)
                self._reserve(t, slot, meta)
                reserved.append((slot, int(t.version[slot]), i))
        for slot, victim in victims:  # still ours (WRITING): copy the old bytes out first
            if keep_evicted_min_frequency and victim.frequency >= keep_evicted_min_frequency:
                result.kept_evicted.append(victim)
                result.evicted_data.append(self.data[slot].clone())
        if reserved:
            index = torch.tensor([slot for slot, _, _ in reserved], dtype=torch.long)
            rows = torch.tensor([i for _, _, i in reserved], dtype=torch.long)
            self.data.index_copy_(0, index, data.index_select(0, rows).to(self.data.dtype))
        with self.segment.locked() as t:
            for slot, version, i in reserved:
                if int(t.version[slot]) == version:
                    t.state[slot] = READY
                    result.stored.append(metas[i])
        return result

    def _free_slot(self, t: SlotArrays, taken: set[int]) -> int:
        """A FREE slot, else the least recently used READY one not reserved in this call."""
        free = np.flatnonzero(t.state == FREE)
        if free.size:
            return int(free[0])
        ready = t.state == READY
        if taken:
            ready = ready.copy()
            ready[list(taken)] = False
        if not ready.any():
            return self._reclaim_dead_writer(t)
        ticks = np.where(ready, t.tick, np.iinfo(np.uint64).max)
        return int(np.argmin(ticks))

    def _reclaim_dead_writer(self, t: SlotArrays) -> int:
        for slot in np.flatnonzero(t.state == WRITING):
            owner = int(t.owner[slot])
            if owner != self.pid and not (owner > 0 and psutil.pid_exists(owner)):
                t.state[slot] = FREE
                return int(slot)
        return -1

    def _reserve(self, t: SlotArrays, slot: int, meta: BlockMeta) -> None:
        header = t.header
        version = int(header["next_version"][0])
        header["next_version"] = version + 1
        t.version[slot] = version
        t.state[slot] = WRITING
        t.owner[slot] = self.pid
        t.hash[slot] = meta.block_hash
        t.has_parent[slot] = meta.parent_hash is not None
        t.parent[slot] = meta.parent_hash or 0
        t.seed[slot] = meta.hash_seed
        t.tokens[slot] = meta.token_ids
        t.frequency[slot] = meta.frequency
        self._touch(t, slot)
        self._slot_of[meta.block_hash] = slot

    @staticmethod
    def _touch(t: SlotArrays, slot: int) -> None:
        tick = int(t.header["tick"][0])
        t.header["tick"] = tick + 1
        t.tick[slot] = tick

    # ---- whole-tier operations ----------------------------------------------------------------

    def blocks(self) -> list[BlockMeta]:
        """Every block held, least recently used first (for dumps)."""
        with self.segment.locked() as t:
            ready = np.flatnonzero(t.state == READY)
            order = ready[np.argsort(t.tick[ready], kind="stable")]
            return [_meta(t, int(slot)) for slot in order]

    def clear(self) -> list[int]:
        """Drop every block (a private tier only; a node-wide one is left to its other users).
        Returns the hashes dropped."""
        if self.shared:
            return []
        with self.segment.locked() as t:
            ready = np.flatnonzero(t.state == READY)
            dropped = [int(h) for h in t.hash[ready]]
            t.state[ready] = FREE
        self._slot_of.clear()
        return dropped


def _meta(t: SlotArrays, slot: int) -> BlockMeta:
    return BlockMeta(
        block_hash=int(t.hash[slot]),
        parent_hash=int(t.parent[slot]) if t.has_parent[slot] else None,
        hash_seed=int(t.seed[slot]),
        token_ids=tuple(int(x) for x in t.tokens[slot]),
        frequency=int(t.frequency[slot]),
    )
