"""Active load per worker: what the router has sent there that is still running.

The router books every request it routes (``add_request``) and releases it in two steps, as
Dynamo's active-sequence tracker does: the uncached prefill tokens at the first output token
(``mark_prefill_done``) and the KV blocks at finish or abort (``free``). Two numbers per worker
feed the cost (``cost.py``):

* ``prefill_tokens(worker)``: uncached prompt tokens (prompt − cached) of requests still in
  prefill; this is work queued before the worker can produce first tokens.
* ``decode_blocks(worker)``: KV blocks held by the worker's running requests. The full blocks of
  a prompt are ref-counted by sequence hash, so a prefix shared by several running requests on
  the same worker counts once; the trailing partial block (and any block without a hash) belongs
  to its request alone, so a request occupies ``ceil(prompt_tokens / block_size)`` blocks.

A request whose release never arrives (a lost stream, a crashed frontend) would inflate its
worker's load forever, so entries not touched for ``expiry_s`` seconds (booked, or marked prefill
done) are force-expired. The clock is injectable for tests.

All operations are idempotent and unknown ids are ignored. Not thread-safe: use it from one
event loop (the router's).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(slots=True)
class _Request:
    worker_id: str
    seq_hashes: tuple[int, ...]
    private_blocks: int
    prefill_tokens: int
    touched_at: float


@dataclass(slots=True)
class _WorkerLoad:
    prefill_tokens: int = 0
    private_blocks: int = 0
    block_refs: dict[int, int] = field(default_factory=dict)
    requests: int = 0

    @property
    def decode_blocks(self) -> int:
        return len(self.block_refs) + self.private_blocks


class ActiveLoad:
    """Prefill tokens and KV blocks of the requests routed to each worker."""

    def __init__(self, block_size: int, expiry_s: float = 300.0, clock: Callable[[], float] = time.monotonic) -> None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        if not expiry_s > 0:
            raise ValueError(f"expiry_s must be > 0, got {expiry_s!r}")
        self.block_size = block_size
        self.expiry_s = float(expiry_s)
        self._clock = clock
        # Ordered by last touch (oldest first), so expiry pops from the front.
        self._requests: OrderedDict[str, _Request] = OrderedDict()
        self._workers: dict[str, _WorkerLoad] = {}
        self.expired_total = 0
        """Requests force-expired so far (a non-zero value hints at lost releases)."""

    # -- booking -----------------------------------------------------------------------------

    def add_request(
        self, request_id: str, worker_id: str, seq_hashes: list[int], num_prompt_tokens: int, num_cached_tokens: int = 0
    ) -> None:
        """Book a request routed to ``worker_id``.

        ``seq_hashes`` are the sequence hashes of the prompt's full blocks (DESIGN §4 block
        hashing); ``num_cached_tokens`` the prompt tokens the worker already holds. Booking an id
        that is already booked replaces the earlier booking.
        """
        self.expire()
        if request_id in self._requests:
            self.free(request_id)
        num_prompt_tokens = max(0, int(num_prompt_tokens))
        hashes = tuple(dict.fromkeys(seq_hashes))  # a hash listed twice is still one block
        total_blocks = -(-num_prompt_tokens // self.block_size)
        entry = _Request(
            worker_id=worker_id,
            seq_hashes=hashes,
            private_blocks=max(0, total_blocks - len(hashes)),
            prefill_tokens=max(0, num_prompt_tokens - max(0, int(num_cached_tokens))),
            touched_at=self._clock(),
        )
        self._requests[request_id] = entry
        load = self._workers.setdefault(worker_id, _WorkerLoad())
        load.requests += 1
        load.prefill_tokens += entry.prefill_tokens
        load.private_blocks += entry.private_blocks
        refs = load.block_refs
        for h in hashes:
            refs[h] = refs.get(h, 0) + 1

    def mark_prefill_done(self, request_id: str) -> None:
        """The request produced its first token: release its prefill tokens (blocks stay)."""
        self.expire()
        entry = self._requests.get(request_id)
        if entry is None:
            return
        entry.touched_at = self._clock()
        self._requests.move_to_end(request_id)
        if entry.prefill_tokens:
            self._workers[entry.worker_id].prefill_tokens -= entry.prefill_tokens
            entry.prefill_tokens = 0

    def free(self, request_id: str) -> None:
        """The request finished or was aborted: release everything it holds."""
        entry = self._requests.pop(request_id, None)
        if entry is not None:
            self._release(entry)

    def remove_worker(self, worker_id: str) -> None:
        """Forget a worker that left, with all requests booked on it."""
        self._workers.pop(worker_id, None)
        for request_id in [rid for rid, entry in self._requests.items() if entry.worker_id == worker_id]:
            del self._requests[request_id]

    def expire(self) -> list[str]:
        """Force-expire requests not touched for ``expiry_s``; returns their ids.

        Called by every booking operation and query, so callers need not run it themselves.
        """
        if not self._requests:
            return []
        deadline = self._clock() - self.expiry_s
        expired = []
        while self._requests:
            request_id, entry = next(iter(self._requests.items()))
            if entry.touched_at > deadline:
                break
            del self._requests[request_id]
            self._release(entry)
            expired.append(request_id)
        self.expired_total += len(expired)
        return expired

    def _release(self, entry: _Request) -> None:
        load = self._workers.get(entry.worker_id)
        if load is None:
            return
        load.requests -= 1
        load.prefill_tokens -= entry.prefill_tokens
        load.private_blocks -= entry.private_blocks
        refs = load.block_refs
        for h in entry.seq_hashes:
            count = refs[h] - 1
            if count:
                refs[h] = count
            else:
                del refs[h]
        if load.requests == 0:
            del self._workers[entry.worker_id]

    # -- queries -----------------------------------------------------------------------------

    def prefill_tokens(self, worker_id: str) -> int:
        """Uncached prompt tokens of the worker's requests that have not produced a token yet."""
        self.expire()
        load = self._workers.get(worker_id)
        return load.prefill_tokens if load else 0

    def decode_blocks(self, worker_id: str) -> int:
        """KV blocks held by the worker's active requests (shared prefix blocks counted once)."""
        self.expire()
        load = self._workers.get(worker_id)
        return load.decode_blocks if load else 0

    def active_requests(self, worker_id: str) -> int:
        """Requests booked on the worker and not yet freed."""
        self.expire()
        load = self._workers.get(worker_id)
        return load.requests if load else 0

    def loads(self, worker_ids: list[str]) -> dict[str, tuple[int, int]]:
        """``(prefill_tokens, decode_blocks)`` of each worker, expiring stale entries once."""
        self.expire()
        get = self._workers.get
        return {
            wid: ((load.prefill_tokens, load.decode_blocks) if (load := get(wid)) else (0, 0)) for wid in worker_ids
        }

    def workers(self) -> list[str]:
        """Workers with at least one active request."""
        self.expire()
        return sorted(self._workers)

    def worker_of(self, request_id: str) -> str | None:
        """The worker a request is booked on, or None."""
        entry = self._requests.get(request_id)
        return entry.worker_id if entry else None

    def __len__(self) -> int:
        return len(self._requests)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._requests

    def snapshot(self) -> dict[str, dict[str, int]]:
        """Per worker ``{prefill_tokens, decode_blocks, active_requests}`` (for status pages)."""
        self.expire()
        return {
            wid: {
                "prefill_tokens": load.prefill_tokens,
                "decode_blocks": load.decode_blocks,
                "active_requests": load.requests,
            }
            for wid, load in sorted(self._workers.items())
        }
