"""Brings tier blocks back into the engine's pool for the scheduler (``TierOnboarding``).

At ``match`` the host (G2) run is copied out at once, before the scheduler allocates pool
blocks for it: that allocation may evict pool blocks into G2, which must not push out the very
blocks being onboarded. ``onboard`` then writes them into their pool blocks. The disk (G3) run
that follows is read and checked on the tiers' reader thread while the request is parked, and
the engine thread writes it into the pool when it polls (``take_finished``), so only the engine
thread ever writes the pool. A block that fails to arrive ends the onboarded run there: the
rest of the prompt is recomputed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from tandem.engine.kv_tiers.block_meta import BlockMeta
from tandem.engine.kv_tiers.tiers import KvTiers
from tandem.engine.request import Request

logger = logging.getLogger(__name__)

WriteBlocks = Callable[[list[int], torch.Tensor], None]
"""Writes blocks' KV (``[n, *block_shape]``) into the pool's blocks with these ids."""


@dataclass
class _Staged:
    """A match's host run, copied out, waiting for its pool blocks."""

    first_block: int
    metas: list[BlockMeta]
    data: torch.Tensor
    num_disk: int
    started: float


@dataclass
class _PendingLoad:
    request: Request
    first_block: int
    num_host: int
    future: Future[tuple[list[BlockMeta], torch.Tensor, list[int]]]
    started: float


class TierOnboarder:
    def __init__(self, tiers: KvTiers, write_blocks: WriteBlocks) -> None:
        self.tiers = tiers
        self.write_blocks = write_blocks
        self._staged: dict[str, _Staged] = {}
        self._pending: dict[str, _PendingLoad] = {}
        self._done = threading.Event()

    def match(self, request: Request, first_block: int, num_blocks: int) -> int:
        staged = self._staged.get(request.request_id)
        if staged is not None and staged.first_block == first_block and len(staged.metas) <= num_blocks:
            # Matched before, and the pool had no room then: reuse that copy (no second use counted).
            disk = self.tiers.disk
            rest = request.block_hashes[first_block + len(staged.metas) : first_block + num_blocks]
            staged.num_disk = disk.match(rest) if disk is not None else 0
            return len(staged.metas) + staged.num_disk
        started = time.monotonic()
        metas, data, num_disk = self.tiers.lookup(request.block_hashes[first_block : first_block + num_blocks])
        if not metas and not num_disk:
            self._staged.pop(request.request_id, None)
            return 0
        self._staged[request.request_id] = _Staged(first_block, metas, data, num_disk, started)
        return len(metas) + num_disk

    def onboard(self, request: Request, first_block: int, num_blocks: int) -> int | None:
        staged = self._staged.pop(request.request_id, None)
        if staged is None or staged.first_block != first_block:
            return 0  # nothing matched for these blocks: the scheduler computes them
        num_host = min(len(staged.metas), num_blocks)
        if num_host:
            self._write(request, first_block, staged.metas[:num_host], staged.data[:num_host])
        num_disk = min(staged.num_disk, num_blocks - num_host)
        start = first_block + num_host
        future = self.tiers.read_disk_async(request.block_hashes[start : start + num_disk]) if num_disk else None
        if future is None:
            self.tiers.record_onboard(num_host, 0, time.monotonic() - staged.started)
            return num_host
        self._pending[request.request_id] = _PendingLoad(request, first_block, num_host, future, staged.started)
        future.add_done_callback(lambda _: self._done.set())
        return None

    def take_finished(self) -> list[tuple[Request, int]]:
        finished: list[tuple[Request, int]] = []
        for request_id, load in list(self._pending.items()):
            if not load.future.done():
                continue
            del self._pending[request_id]
            try:
                metas, data, _ = load.future.result()
            except Exception:  # a failed read is a miss: the blocks are recomputed
                logger.exception("KV disk tier: reading blocks for %s failed", request_id)
                metas, data = [], torch.empty(0)
            if metas:
                self._write(load.request, load.first_block + load.num_host, metas, data)
            self.tiers.record_onboard(load.num_host, len(metas), time.monotonic() - load.started)
            finished.append((load.request, load.num_host + len(metas)))
        return finished

    def cancel(self, request: Request) -> None:
        self._staged.pop(request.request_id, None)
        self._pending.pop(request.request_id, None)

    def wait(self, timeout: float) -> None:
        if any(load.future.done() for load in self._pending.values()):
            return
        self._done.wait(timeout)
        self._done.clear()

    def _write(self, request: Request, first_block: int, metas: list[BlockMeta], data: torch.Tensor) -> None:
        blocks = request.block_table[first_block : first_block + len(metas)]
        self.write_blocks([b.block_id for b in blocks], data)
        for block, meta in zip(blocks, metas):
            block.num_hits = meta.frequency  # carry the block's use count back into G1
