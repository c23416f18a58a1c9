"""Jittered exponential backoff for reconnect loops (etcd calls, waiting for discovery at start)."""

from __future__ import annotations

import random

BACKOFF_INITIAL_S = 0.1
BACKOFF_MAX_S = 2.0


class Backoff:
    """Jittered exponential delays: ``initial`` doubling up to ``cap``, each drawn in [d/2, d]."""

    def __init__(self, initial: float = BACKOFF_INITIAL_S, cap: float = BACKOFF_MAX_S) -> None:
        self.initial, self.cap = initial, cap
        self._attempt = 0

    def next(self) -> float:
        delay = min(self.cap, self.initial * 2**self._attempt)
        self._attempt += 1
        return random.uniform(delay / 2, delay)

    def reset(self) -> None:
        self._attempt = 0
