"""The KV tiers below one engine's pool: what goes down (offload), what comes back (onboard),
the KV events that say which tier holds a block, and the tier counters.

* **Offload** runs on the engine thread, inside the pool's allocation (evict policy) or at the
  end of a step (write-through): G1 bytes → G2 in one copy. Blocks G2 evicts that were used at
  least ``disk_min_frequency`` times go to G3 on the writer thread (without a host tier, G1
  evictions go there directly). A block already in a tier only counts a use.
* **Onboard**: G2 blocks are copied back at once; G3 blocks are read and checked on the reader
  thread while the engine goes on with other requests (``onboard.TierOnboarder``).
* **Events**: ``BlockStored``/``BlockRemoved`` with ``medium`` ``CPU`` (G2) and ``DISK`` (G3),
  taken with the pool's own (``GPU``) events after each step.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeoutError
from dataclasses import dataclass

import msgspec
import torch

from tandem.engine.kv_tiers import disk_format
from tandem.engine.kv_tiers.block_meta import BlockMeta, parents_first, removed_event, stored_events
from tandem.engine.kv_tiers.config import KvTierConfig
from tandem.engine.kv_tiers.disk_pool import DiskPool, DiskTierError
from tandem.engine.kv_tiers.host_pool import HostPool
from tandem.engine.kv_tiers.host_segment import HostSegment, layout_fingerprint
from tandem.protocols.endpoints import KvTierStats
from tandem.protocols.kv_events import MEDIUM_CPU, MEDIUM_DISK, KVEvent

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class KvLayout:
    """What a tier must know of the engine's KV blocks."""

    block_size: int
    block_shape: list[int]
    """One block's KV: [layers, 2, block_size, kv_heads, head_dim]."""
    dtype: torch.dtype
    layout_id: str
    """Model, dtype and shape as text: tiers share blocks only between equal layouts."""

    @property
    def block_bytes(self) -> int:
        return torch.Size(self.block_shape).numel() * torch.tensor([], dtype=self.dtype).element_size()


class KvTiers:
    def __init__(self, config: KvTierConfig, layout: KvLayout) -> None:
        self.config = config
        self.layout = layout
        self.block_size = layout.block_size
        self.stats = KvTierStats()
        fingerprint = layout_fingerprint(layout.layout_id)
        block_bytes = layout.block_bytes
        self.host: HostPool | None = None
        host_slots = int(config.host_cache_gib * 2**30) // block_bytes
        segment: HostSegment | None = None
        if config.host_cache_shared is not None:
            segment = HostSegment.attach(
                config.host_cache_shared, host_slots, layout.block_size, block_bytes, fingerprint
            )
        elif host_slots > 0:
            segment = HostSegment.private(host_slots, layout.block_size, block_bytes, fingerprint)
        if segment is not None:
            self.host = HostPool(segment, layout.block_shape, layout.dtype)
        self.disk: DiskPool | None = None
        self.disk_unavailable: str | None = None
        """Why the configured disk tier could not be used (serving goes on without it)."""
        if config.disk_cache_gib > 0 and config.disk_cache_dir:
            capacity = int(config.disk_cache_gib * 2**30) // disk_format.file_size(layout.block_size, block_bytes)
            try:
                self.disk = DiskPool(
                    config.disk_cache_dir, capacity, layout.block_size, layout.block_shape, layout.dtype, fingerprint
                )
            except DiskTierError as exc:
                logger.error("KV disk tier off: %s; serving goes on without it", exc)
                self.disk_unavailable = str(exc)
        self._events: list[KVEvent] = []
        self._events_lock = threading.Lock()
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="tandem-kv-disk-write")
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="tandem-kv-disk-read")
        self.on_events: Callable[[], None] | None = None
        """Called after the writer or reader thread records events (the engine loop sets it to
        wake up and publish them)."""
        if self.disk is not None:
            found = self.disk.scan()
            if found:
                logger.info("KV disk tier: %d blocks found in %s", len(found), self.disk.directory)
                self._emit(stored_events(found, self.block_size, MEDIUM_DISK))

    @property
    def node_tier_name(self) -> str | None:
        """The node-wide host tier's name, if the host tier is one."""
        return self.host.segment.name if self.host is not None else None

    # ---- offload --------------------------------------------------------------------------------

    def needs_bytes(self, metas: list[BlockMeta]) -> list[bool]:
        """For each block G1 is about to give up: whether its bytes must be read (False: a tier
        already holds it, or no tier would take it). Blocks already held count a use."""
        if self.host is not None:
            return [not held for held in self.host.note_uses(metas)]
        disk = self.disk
        if disk is None:
            return [False] * len(metas)
        return [
            meta.frequency >= self.config.disk_min_frequency and not disk.note_use(meta.block_hash, meta.frequency)
            for meta in metas
        ]

    def offload(self, metas: list[BlockMeta], data: torch.Tensor) -> None:
        """Take blocks leaving G1 (``data[i]`` holds ``metas[i]``; on the engine thread)."""
        if not metas:
            return
        if self.host is None:
            for i, meta in enumerate(metas):
                self._write_to_disk(meta, data[i].clone(), "offloaded_g1_g3")
            return
        keep = self.config.disk_min_frequency if self.disk is not None else 0
        result = self.host.store(metas, data, keep)
        with self._events_lock:
            self.stats.offloaded_g1_g2 += len(result.stored)
            self.stats.offloaded_bytes += len(result.stored) * self.layout.block_bytes
            self.stats.dropped_offloads += result.dropped
        events: list[KVEvent] = []
        if result.evicted:
            events.append(removed_event([m.block_hash for m in result.evicted], MEDIUM_CPU))
        events.extend(stored_events(result.stored, self.block_size, MEDIUM_CPU))
        self._emit(events)
        for meta, block in zip(result.kept_evicted, result.evicted_data):
            self._write_to_disk(meta, block, "offloaded_g2_g3")

    def _write_to_disk(self, meta: BlockMeta, block: torch.Tensor, counter: str) -> None:
        disk = self.disk
        if disk is None or disk.contains(meta.block_hash):
            return

        def write() -> None:
            written, evicted = disk.write(meta, block)
            events: list[KVEvent] = []
            with self._events_lock:  # counters are shared with the engine thread
                if evicted:
                    events.append(removed_event(evicted, MEDIUM_DISK))
                if written:
                    setattr(self.stats, counter, getattr(self.stats, counter) + 1)
                    self.stats.offloaded_bytes += self.layout.block_bytes
                    events.extend(stored_events([meta], self.block_size, MEDIUM_DISK))
            self._emit(events)

        self._writer.submit(write)

    def wait_for_writes(self, timeout: float = 10.0) -> bool:
        """Wait until the disk writes queued so far are done, their events and counters
        included (tests, shutdown); False on timeout. The writer is one thread working in
        order, so a no-op queued now finishes after all of them."""
        try:
            self._writer.submit(lambda: None).result(timeout)
        except FutureTimeoutError:
            return False
        return True

    # ---- onboard --------------------------------------------------------------------------------

    def lookup(self, hashes: list[int]) -> tuple[list[BlockMeta], torch.Tensor, int]:
        """The tiers' part of a prefix match: the leading run of ``hashes`` in G2, copied out
        now (so that making room in G1 for them cannot push them out of G2 first), and how many
        blocks right after that run G3 holds (read later, off the engine thread)."""
        if not hashes:
            return [], self._no_blocks(), 0
        self.stats.lookups += 1
        self.stats.looked_up_blocks += len(hashes)
        metas, data = self.read_host(hashes)
        num_disk = self.disk.match(hashes[len(metas) :]) if self.disk is not None else 0
        return metas, data, num_disk

    def _no_blocks(self) -> torch.Tensor:
        return torch.empty(0, *self.layout.block_shape, dtype=self.layout.dtype)

    def read_host(self, hashes: list[int]) -> tuple[list[BlockMeta], torch.Tensor]:
        """The leading run of ``hashes`` that G2 delivers (engine thread)."""
        if self.host is None or not hashes:
            return [], self._no_blocks()
        metas, data = self.host.read(hashes)
        self.stats.host_hit_blocks += len(metas)
        return metas, data

    def read_disk_async(self, hashes: list[int]) -> Future[tuple[list[BlockMeta], torch.Tensor, list[int]]] | None:
        """Read the leading run of ``hashes`` from G3 on the reader thread; None without G3."""
        disk = self.disk
        if disk is None or not hashes:
            return None

        def read() -> tuple[list[BlockMeta], torch.Tensor, list[int]]:
            metas, data, dropped = disk.read(hashes)
            if dropped:
                self._emit([removed_event(dropped, MEDIUM_DISK)])
            return metas, data, dropped

        return self._reader.submit(read)

    def record_onboard(self, num_host: int, num_disk: int, seconds: float) -> None:
        self.stats.onboarded_g2_g1 += num_host
        self.stats.onboarded_g3_g1 += num_disk
        self.stats.disk_hit_blocks += num_disk
        self.stats.onboarded_bytes += (num_host + num_disk) * self.layout.block_bytes
        self.stats.onboards += 1
        self.stats.onboard_seconds_total += seconds

    # ---- events, stats, lifecycle ---------------------------------------------------------------

    def _emit(self, events: list[KVEvent]) -> None:
        if not events:
            return
        with self._events_lock:
            self._events.extend(events)
        if self.on_events is not None:
            self.on_events()

    def take_events(self) -> list[KVEvent]:
        with self._events_lock:
            events, self._events = self._events, []
        return events

    def current_events(self) -> list[KVEvent]:
        """Every block the tiers hold now, as BlockStored events (a dump), parents first."""
        events: list[KVEvent] = []
        if self.host is not None:
            events.extend(stored_events(parents_first(self.host.blocks()), self.block_size, MEDIUM_CPU))
        if self.disk is not None:
            events.extend(stored_events(parents_first(self.disk.blocks()), self.block_size, MEDIUM_DISK))
        return events

    def snapshot(self) -> KvTierStats:
        with self._events_lock:
            stats = msgspec.structs.replace(self.stats)
        if self.host is not None:
            stats.host_blocks = self.host.num_used()
            stats.host_capacity_blocks = self.host.num_slots
            stats.host_shared = self.host.segment.name
        stats.disk_unavailable = self.disk_unavailable
        if self.disk is not None:
            stats.disk_blocks = len(self.disk)
            stats.disk_capacity_blocks = self.disk.capacity_blocks
            stats.disk_writes_paused = self.disk.writes_paused
            counters = self.disk.counters
            stats.disk_write_errors = counters.write_errors
            stats.disk_corrupt_blocks = counters.corrupt_blocks
            stats.disk_missing_blocks = counters.missing_blocks
        return stats

    def clear(self) -> None:
        """Drop what this engine's private tiers hold (a node-wide host tier is left alone)."""
        self.wait_for_writes()
        if self.host is not None:
            dropped = self.host.clear()
            if dropped:
                self._emit([removed_event(dropped, MEDIUM_CPU)])
        if self.disk is not None:
            dropped = self.disk.clear()
            if dropped:
                self._emit([removed_event(dropped, MEDIUM_DISK)])

    def close(self) -> None:
        self._writer.shutdown(wait=True, cancel_futures=False)
        self._reader.shutdown(wait=True, cancel_futures=True)
        if self.disk is not None:
            self.disk.close()
        if self.host is not None:
            self.host.segment.close()
