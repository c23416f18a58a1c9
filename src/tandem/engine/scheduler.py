"""Continuous batching under one token budget, with chunked prefill and preemption by recompute.

Every request needs ``num_tokens - num_computed_tokens`` tokens run through the model: one for a
decoding request, the rest of the prompt for a prefilling one. Each step spends a budget of
``max_num_batched_tokens``:

1. Running requests first, oldest first. A prefill longer than the remaining budget is chunked.
   When the pool has no block for a request, the newest running request is preempted (its blocks
   freed, its progress reset, and it goes to the front of the waiting queue) until one frees up.
2. Then waiting requests, first come first served, up to ``max_num_seqs`` running — unless this
   step preempted someone (no point admitting new work into a full pool). A waiting request
   first takes whatever prefix of its blocks the prefix cache holds.

A preempted request is older than every waiting one, so it resumes first: nothing starves.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

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
        self.num_preemptions = 0

    def add_request(self, request: Request) -> None:
        self.waiting.append(request)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
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
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            hits = self.kv.get_computed_blocks(request)
            num_cached = len(hits) * self.kv.block_size
            num_new = min(request.num_tokens - num_cached, budget)
            if not self.kv.allocate_slots(request, num_new, hits):
                break
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_cached
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.chunks.append(ScheduledChunk(request, num_new))
            budget -= num_new
        return budget

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
        self.kv.free(request)
