"""Continuous batching under one token budget, with chunked prefill and preemption by recompute.

Every request needs ``num_tokens - num_computed_tokens`` tokens run through the model: one for a
decoding request, the rest of the prompt for a prefilling one. Each step spends a budget of
``max_num_batched_tokens``:

1. Running requests first, oldest first. A prefill longer than the remaining budget is chunked.
   When the pool has no block for a request, the newest running request is preempted (its blocks
   freed, its progress reset, and it goes to the front of the waiting queue) until one frees up.
2. Then waiting requests, first come first served, up to ``max_num_seqs`` running — unless this
   step preempted someone (no point admitting new work into a full pool). A waiting request
   first takes whatever prefix of its blocks the prefix cache holds; with KV tiers below the
   pool (``tiers``), the match goes on into them and those blocks are onboarded into fresh
   blocks. Host blocks arrive at once; a request that waits for disk blocks is parked in
   ``loading`` (holding its blocks, not stepping) and joins the running requests at the first
   step after its blocks are in, while the others keep stepping.

A preempted request is older than every waiting one, so it resumes first: nothing starves.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from tandem.engine.kv_cache_manager import KVCacheManager
from tandem.engine.request import Request, RequestStatus


@dataclass
class ScheduledChunk:
    request: Request
    num_tokens: int
    """Tokens of this request that run this step, starting at request.num_computed_tokens."""


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    num_batched_tokens: int = 0
    preempted: list[Request] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


class TierOnboarding(Protocol):
    """KV tiers below the pool, as the scheduler sees them (``kv_tiers.onboard``)."""

    def match(self, request: Request, first_block: int, num_blocks: int) -> int:
        """How many of the request's blocks ``first_block..`` (up to ``num_blocks``) the tiers
        hold; they may be staged for the ``onboard`` that follows a successful allocation."""
        ...

    def onboard(self, request: Request, first_block: int, num_blocks: int) -> int | None:
        """Load those blocks into ``request.block_table[first_block:...]`` (already allocated).
        Returns how many leading ones arrived, or None while some are still on their way."""
        ...

    def take_finished(self) -> list[tuple[Request, int]]:
        """Requests whose pending loads ended, with how many blocks arrived in all."""
        ...

    def cancel(self, request: Request) -> None:
        """Forget the request's pending load or staged match (it finished or was aborted)."""
        ...

    def wait(self, timeout: float) -> None:
        """Block until some pending load ends, or ``timeout`` seconds."""
        ...


class Scheduler:
    def __init__(
        self, kv_manager: KVCacheManager, max_num_batched_tokens: int, max_num_seqs: int, max_model_len: int
    ) -> None:
        self.kv = kv_manager
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.loading: list[Request] = []
        """Admitted requests waiting for tier blocks (they hold their blocks but do not step)."""
        self.tiers: TierOnboarding | None = None
        self.num_preemptions = 0

    def add_request(self, request: Request) -> None:
        self.waiting.append(request)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.loading)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        if self.loading:
            self._resume_loaded()
        budget = self.max_num_batched_tokens
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self._allocate_or_preempt(request, num_new, out):
                break  # the request itself was preempted; everything after it was too
            out.chunks.append(ScheduledChunk(request, num_new))
            budget -= num_new
            index += 1
        if not out.preempted:
            budget = self._admit_waiting(budget, out)
        out.num_batched_tokens = self.max_num_batched_tokens - budget
        return out

    def _allocate_or_preempt(self, request: Request, num_new: int, out: SchedulerOutput) -> bool:
        while not self.kv.allocate_slots(request, num_new):
            victim = self.running.pop()
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _admit_waiting(self, budget: int, out: SchedulerOutput) -> int:
        bs = self.kv.block_size
        while self.waiting and budget > 0 and len(self.running) + len(self.loading) < self.max_num_seqs:
            request = self.waiting[0]
            hits = self.kv.get_computed_blocks(request)
            num_tier = self._tier_match(request, len(hits))
            num_cached = (len(hits) + num_tier) * bs
            num_new = min(request.num_tokens - num_cached, budget)
            if not self.kv.allocate_slots(request, num_tier * bs + num_new, hits):
                break
            self.waiting.popleft()
            if num_tier:
                assert self.tiers is not None
                loaded = self.tiers.onboard(request, len(hits), num_tier)
                if loaded is None:
                    self.loading.append(request)
                    continue
                self._onboarded(request, loaded)
                # Blocks that did not arrive are recomputed, inside the blocks already allocated.
                room = len(request.block_table) * bs - request.num_computed_tokens
                num_new = min(request.num_tokens - request.num_computed_tokens, budget, room)
            elif request.num_cached_tokens < 0:
                request.num_cached_tokens = num_cached
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.chunks.append(ScheduledChunk(request, num_new))
            budget -= num_new
        return budget

    def _tier_match(self, request: Request, first_block: int) -> int:
        if self.tiers is None:
            return 0
        # Like a G1 hit, a tier hit never covers the last prompt token (its logits are needed).
        max_blocks = (request.num_tokens - 1) // self.kv.block_size
        if first_block >= max_blocks:
            return 0
        return self.tiers.match(request, first_block, max_blocks - first_block)

    def _onboarded(self, request: Request, num_blocks: int) -> None:
        """Count ``num_blocks`` onboarded blocks as computed and publish them to the prefix cache."""
        request.num_computed_tokens += num_blocks * self.kv.block_size
        self.kv.cache_full_blocks(request)
        if request.num_cached_tokens < 0:
            request.num_cached_tokens = request.num_computed_tokens

    def _resume_loaded(self) -> None:
        """Move requests whose tier blocks have arrived from ``loading`` to ``running``."""
        assert self.tiers is not None
        for request, num_blocks in self.tiers.take_finished():
            if request not in self.loading:
                continue  # aborted meanwhile
            self.loading.remove(request)
            self._onboarded(request, num_blocks)
            request.status = RequestStatus.RUNNING
            self.running.append(request)

    def finish_step(self, out: SchedulerOutput) -> list[Request]:
        """Advance progress after the forward pass; returns the requests due for a new token."""
        due: list[Request] = []
        for chunk in out.chunks:
            request = chunk.request
            request.num_computed_tokens += chunk.num_tokens
            self.kv.cache_full_blocks(request)
            if request.num_computed_tokens == request.num_tokens:
                due.append(request)
        return due

    def finish_request(self, request: Request, status: RequestStatus) -> None:
        """Remove a request from the queues and free its blocks."""
        request.status = status
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        elif request in self.loading:
            self.loading.remove(request)
        if self.tiers is not None:
            self.tiers.cancel(request)  # drops a pending load, or blocks staged by a match
        self.kv.free(request)
