"""Load-balancing policies that need no knowledge of the workers' KV caches.

A policy picks one worker card among the candidates that serve the requested model. The KV-aware
policy (DESIGN.md §4, cost over cached blocks and load) will implement the same interface.
"""

from __future__ import annotations

import itertools
import random
from typing import Protocol

from tandem.protocols.worker_card import WorkerCard


class RoutingPolicy(Protocol):
    name: str

    def select(self, candidates: list[WorkerCard], token_ids: list[int]) -> WorkerCard:
        """One of ``candidates`` (never empty) for a request with these prompt tokens."""
        ...


class RoundRobinPolicy:
    """Cycles through the candidates in worker-id order; a worker that leaves is simply skipped.

    Each distinct candidate set has its own counter: with one shared counter, a disaggregated
    request (a prefill pick then a decode pick) would advance it twice, and with an even number
    of prefill workers every prefill would land on the same half of them."""

    name = "round-robin"
    MAX_SETS = 1024
    """Counters kept before they are all reset (candidate sets change as workers come and go)."""

    def __init__(self) -> None:
        self._counters: dict[tuple[str, ...], itertools.count] = {}

    def select(self, candidates: list[WorkerCard], token_ids: list[int]) -> WorkerCard:
        ordered = sorted(candidates, key=lambda card: card.worker_id)
        key = tuple(card.worker_id for card in ordered)
        counter = self._counters.get(key)
        if counter is None:
            if len(self._counters) >= self.MAX_SETS:
                self._counters.clear()
            counter = self._counters[key] = itertools.count()
        return ordered[next(counter) % len(ordered)]


class RandomPolicy:
    """Uniformly random choice (seedable for tests and simulations)."""

    name = "random"

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def select(self, candidates: list[WorkerCard], token_ids: list[int]) -> WorkerCard:
        return self._rng.choice(candidates)


POLICIES = {"round-robin": RoundRobinPolicy, "random": RandomPolicy}
"""Policies that need nothing but the candidates."""
ROUTER_NAMES = ("round-robin", "random", "kv", "least-loaded", "remote")
"""Every ``--router`` choice; ``kv`` and ``least-loaded`` track load and are built by the frontend."""


def make_policy(name: str) -> RoutingPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown router policy {name!r}; choose one of {', '.join(POLICIES)}") from None
