"""The routing policy interface: pick a worker for a request, and hear how the request goes.

Every policy (one module each under ``tandem.router.policies``) subclasses :class:`RoutingPolicy`
and overrides what it needs: ``select`` always; the hooks only when it tracks load or state.
The dispatcher (``tandem.router.dispatch``) calls ``choose`` once per attempt, then
``on_first_token`` and ``on_finished``; the frontend's status page calls ``status`` (after
``refresh``), and shutdown calls ``stop``.
"""

from __future__ import annotations

import abc
from typing import Any

from tandem.protocols.worker_card import WorkerCard


class RoutingPolicy(abc.ABC):
    name: str = ""
    """The ``--router`` name it is registered under (``tandem.router.registry``)."""

    @abc.abstractmethod
    def select(self, candidates: list[WorkerCard], token_ids: list[int]) -> WorkerCard:
        """One of ``candidates`` (never empty) for a request with these prompt tokens."""

    def route(
        self, candidates: list[WorkerCard], token_ids: list[int], request_id: str | None, cache_salt: str | None
    ) -> WorkerCard:
        """``select``, for a request the policy may book under ``request_id`` (load-aware policies do)."""
        return self.select(candidates, token_ids)

    async def choose(
        self, candidates: list[WorkerCard], token_ids: list[int], request_id: str | None, cache_salt: str | None
    ) -> WorkerCard:
        """What the dispatcher awaits: ``route`` here; a remote router asks over the network."""
        return self.route(candidates, token_ids, request_id, cache_salt)

    def on_first_token(self, request_id: str) -> None:
        """The routed request produced its first token (its prefill is done)."""

    def on_finished(self, request_id: str) -> None:
        """The routed request ended (finished, failed or cancelled)."""

    async def refresh(self) -> None:
        """Bring ``status`` up to date (a remote router fetches it)."""

    def status(self, cards: list[WorkerCard]) -> dict[str, Any]:
        """What ``/router`` shows for these workers."""
        return {"policy": self.name}

    async def stop(self) -> None:
        """Release what the policy holds (subscriptions, connections)."""
