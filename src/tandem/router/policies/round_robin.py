"""``--router round-robin``: the candidates in turn."""

from __future__ import annotations

import itertools

from tandem.protocols.worker_card import WorkerCard
from tandem.router.policy import RoutingPolicy


class RoundRobinPolicy(RoutingPolicy):
    """Cycles through the candidates in worker-id order; a worker that leaves is simply skipped.

    Each distinct candidate set has its own counter: with one shared counter, a disaggregated
    request (a prefill pick then a decode pick) would advance it twice, and with an even number
    of prefill workers every prefill would land on the same half of them."""

    name = "round-robin"
    MAX_SETS = 1024
    """Counters kept before they are all reset (candidate sets change as workers come and go)."""

    def __init__(self) -> None:
        self._counters: dict[tuple[str, ...], itertools.count[int]] = {}

    def select(self, candidates: list[WorkerCard], token_ids: list[int]) -> WorkerCard:
        ordered = sorted(candidates, key=lambda card: card.worker_id)
        key = tuple(card.worker_id for card in ordered)
        counter = self._counters.get(key)
        if counter is None:
            if len(self._counters) >= self.MAX_SETS:
                self._counters.clear()
            counter = self._counters[key] = itertools.count()
        return ordered[next(counter) % len(ordered)]
