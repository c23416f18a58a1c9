"""``--router random``: a uniformly random candidate."""

from __future__ import annotations

import random

from tandem.protocols.worker_card import WorkerCard
from tandem.router.policy import RoutingPolicy


class RandomPolicy(RoutingPolicy):
    """Uniformly random choice (seedable for tests and simulations)."""

    name = "random"

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def select(self, candidates: list[WorkerCard], token_ids: list[int]) -> WorkerCard:
        return self._rng.choice(candidates)
