"""KV tiers for the mocker: the same bookkeeping as ``KvTiers`` (capacities in blocks, LRU,
dedup, the disk frequency filter, tier KV events and counters) without bytes, and onboarding
that costs modeled time instead of copies.

A request's tier blocks arrive at once; their transfer time (blocks × block bytes ÷ the tier's
bandwidth) is added to the step that admits the request (``take_onboard_ms``), so a served
mocker sleeps it and the virtual-time simulator (``tandem.bench.simulate``) advances its clock
by it. That is conservative for the disk tier, whose real reads overlap other requests' steps.
Mockers in one process that name the same ``host_shared`` tier share one host tier (the
node-wide tier of a simulated node).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from tandem.engine.kv_tiers.block_meta import BlockMeta, parents_first, removed_event, stored_events
from tandem.engine.kv_tiers.config import OFFLOAD_POLICIES
from tandem.engine.request import Request
from tandem.protocols.endpoints import KvTierStats
from tandem.protocols.kv_events import MEDIUM_CPU, MEDIUM_DISK, KVEvent


@dataclass
class ModeledTierConfig:
    num_host_blocks: int = 0
    """Host tier (G2) capacity in blocks; 0 = none."""
    num_disk_blocks: int = 0
    """Disk tier (G3) capacity in blocks; 0 = none."""
    host_shared: str | None = None
    """Mockers of one process naming the same tier share it (a node-wide host tier)."""
    host_onboard_gbs: float = 25.0
    """Host → pool bandwidth in GB/s (about PCIe 4.0 x16 with pinned memory)."""
    disk_onboard_gbs: float = 5.0
    """Disk → pool bandwidth in GB/s (about one NVMe drive)."""
    disk_min_frequency: int = 2
    """A block leaving the host tier goes to disk only if used at least this often."""
    offload_policy: str = "write-through"
    """``evict`` or ``write-through``, as ``KvTierConfig.offload_policy``."""

    def __post_init__(self) -> None:
        if self.num_host_blocks < 0 or self.num_disk_blocks < 0:
            raise ValueError("tier capacities must be >= 0")
        if self.host_onboard_gbs <= 0 or self.disk_onboard_gbs <= 0:
            raise ValueError("tier bandwidths must be > 0")
        if self.disk_min_frequency < 1:
            raise ValueError("disk_min_frequency must be >= 1")
        if self.offload_policy not in OFFLOAD_POLICIES:
            raise ValueError(f"offload_policy must be one of {', '.join(OFFLOAD_POLICIES)}")

    @property
    def enabled(self) -> bool:
        return self.num_host_blocks > 0 or self.num_disk_blocks > 0


class LruTier:
    """Block metadata by sequence hash, least recently used first, at most ``capacity`` blocks."""

    def __init__(self, capacity: int, name: str | None = None) -> None:
        self.capacity = capacity
        self.name = name
        self.blocks: OrderedDict[int, BlockMeta] = OrderedDict()

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self.blocks

    def match(self, hashes: list[int]) -> int:
        for count, block_hash in enumerate(hashes):
            if block_hash not in self.blocks:
                return count
        return len(hashes)

    def use(self, block_hash: int) -> BlockMeta:
        meta = self.blocks[block_hash]
        meta.frequency += 1
        self.blocks.move_to_end(block_hash)
        return meta

    def store(self, meta: BlockMeta) -> tuple[bool, list[BlockMeta]]:
        """(newly stored, blocks evicted for room)."""
        known = self.blocks.get(meta.block_hash)
        if known is not None:
            known.frequency = max(known.frequency, meta.frequency)
            self.blocks.move_to_end(meta.block_hash)
            return False, []
        self.blocks[meta.block_hash] = meta
        evicted = []
        while len(self.blocks) > self.capacity:
            evicted.append(self.blocks.popitem(last=False)[1])
        return True, evicted


_SHARED_HOST_TIERS: dict[str, LruTier] = {}


class ModeledTiers:
    """The mocker's tiers: ``TierOnboarding`` for its scheduler, events and stats for its worker."""

    def __init__(self, config: ModeledTierConfig, block_size: int, block_bytes: int) -> None:
        self.config = config
        self.block_size = block_size
        self.block_bytes = block_bytes
        self.stats = KvTierStats()
        self.host: LruTier | None = None
        if config.host_shared is not None:
            self.host = _SHARED_HOST_TIERS.setdefault(
                config.host_shared, LruTier(config.num_host_blocks, config.host_shared)
            )
        elif config.num_host_blocks > 0:
            self.host = LruTier(config.num_host_blocks)
        self.disk = LruTier(config.num_disk_blocks) if config.num_disk_blocks > 0 else None
        self._events: list[KVEvent] = []
        self._onboard_ms = 0.0
        self.on_events: Callable[[], None] | None = None
        """Never called: the modeled tiers record events on the engine thread only."""

    @property
    def node_tier_name(self) -> str | None:
        """A shared tier is shared by the mockers of this process only: the name says so."""
        name = self.host.name if self.host is not None else None
        return f"{name}@{os.getpid()}" if name else None

    # ---- offload --------------------------------------------------------------------------------

    def offload(self, metas: list[BlockMeta]) -> None:
        for meta in metas:
            if self.host is None:
                if meta.frequency >= self.config.disk_min_frequency:
                    self._to_disk(meta, "offloaded_g1_g3")
                continue
            stored, evicted = self.host.store(meta)
            if evicted:
                self._events.append(removed_event([m.block_hash for m in evicted], MEDIUM_CPU))
            if stored:
                self.stats.offloaded_g1_g2 += 1
                self.stats.offloaded_bytes += self.block_bytes
                self._events.extend(stored_events([meta], self.block_size, MEDIUM_CPU))
            for old in evicted:
                if old.frequency >= self.config.disk_min_frequency:
                    self._to_disk(old, "offloaded_g2_g3")

    def _to_disk(self, meta: BlockMeta, counter: str) -> None:
        if self.disk is None:
            return
        stored, evicted = self.disk.store(meta)
        if evicted:
            self._events.append(removed_event([m.block_hash for m in evicted], MEDIUM_DISK))
        if stored:
            setattr(self.stats, counter, getattr(self.stats, counter) + 1)
            self.stats.offloaded_bytes += self.block_bytes
            self._events.extend(stored_events([meta], self.block_size, MEDIUM_DISK))

    # ---- TierOnboarding -------------------------------------------------------------------------

    def match(self, request: Request, first_block: int, num_blocks: int) -> int:
        hashes = request.block_hashes[first_block : first_block + num_blocks]
        self.stats.lookups += 1
        self.stats.looked_up_blocks += len(hashes)
        num_host = self.host.match(hashes) if self.host is not None else 0
        num_disk = self.disk.match(hashes[num_host:]) if self.disk is not None else 0
        return num_host + num_disk

    def onboard(self, request: Request, first_block: int, num_blocks: int) -> int | None:
        hashes = request.block_hashes[first_block : first_block + num_blocks]
        num_host = self.host.match(hashes) if self.host is not None else 0
        num_disk = min(self.disk.match(hashes[num_host:]) if self.disk is not None else 0, num_blocks - num_host)
        blocks = request.block_table[first_block : first_block + num_host + num_disk]
        for i, block in enumerate(blocks):
            tier = self.host if i < num_host else self.disk
            assert tier is not None
            block.num_hits = tier.use(hashes[i]).frequency
        ms = (
            self.block_bytes * (num_host / self.config.host_onboard_gbs + num_disk / self.config.disk_onboard_gbs) / 1e6
        )
        self._onboard_ms += ms
        s = self.stats
        s.onboarded_g2_g1 += num_host
        s.onboarded_g3_g1 += num_disk
        s.host_hit_blocks += num_host
        s.disk_hit_blocks += num_disk
        s.onboarded_bytes += (num_host + num_disk) * self.block_bytes
        s.onboards += 1
        s.onboard_seconds_total += ms / 1000.0
        return num_host + num_disk

    def take_finished(self) -> list[tuple[Request, int]]:
        return []

    def cancel(self, request: Request) -> None:
        pass

    def wait(self, timeout: float) -> None:
        pass

    def take_onboard_ms(self) -> float:
        """Modeled onboarding time since the last call (added to the current step)."""
        ms, self._onboard_ms = self._onboard_ms, 0.0
        return ms

    # ---- events, stats, lifecycle ---------------------------------------------------------------

    def take_events(self) -> list[KVEvent]:
        events, self._events = self._events, []
        return events

    def current_events(self) -> list[KVEvent]:
        events: list[KVEvent] = []
        for tier, medium in ((self.host, MEDIUM_CPU), (self.disk, MEDIUM_DISK)):
            if tier is not None:
                events.extend(stored_events(parents_first(list(tier.blocks.values())), self.block_size, medium))
        return events

    def snapshot(self) -> KvTierStats:
        stats = msgspec.structs.replace(self.stats)
        if self.host is not None:
            stats.host_blocks, stats.host_capacity_blocks = len(self.host.blocks), self.host.capacity
            stats.host_shared = self.host.name
        if self.disk is not None:
            stats.disk_blocks, stats.disk_capacity_blocks = len(self.disk.blocks), self.disk.capacity
        return stats

    def clear(self) -> None:
        for tier, medium in ((self.host, MEDIUM_CPU), (self.disk, MEDIUM_DISK)):
            if tier is not None and tier.name is None and tier.blocks:
                self._events.append(removed_event(list(tier.blocks), medium))
                tier.blocks.clear()

    def close(self) -> None:
        pass
