"""The KV index of a router without KV events (``--no-kv-events``): its own routing decisions.

Each routed request's blocks are credited to the worker it went to, until a TTL passes; an
approximation of what the worker caches (Dynamo's approximate mode).
"""

from __future__ import annotations


class ApproxIndex:
    """Without KV events: the router's own routing decisions, each block expiring after a TTL."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._holders: dict[int, dict[str, float]] = {}

    def record(self, worker_id: str, seq_hashes: list[int], now: float) -> None:
        for h in seq_hashes:
            self._holders.setdefault(h, {})[worker_id] = now + self.ttl_s

    def find_matches(self, seq_hashes: list[int], now: float) -> dict[str, int]:
        matches: dict[str, int] = {}
        alive: set[str] | None = None
        for depth, h in enumerate(seq_hashes):
            holders = {w for w, until in self._holders.get(h, {}).items() if until > now}
            alive = holders if alive is None else alive & holders
            if not alive:
                break
            for w in alive:
                matches[w] = depth + 1
        return matches

    def remove_worker(self, worker_id: str) -> None:
        for holders in self._holders.values():
            holders.pop(worker_id, None)
