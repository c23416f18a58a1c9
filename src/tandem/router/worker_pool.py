"""The live set of workers, kept current from discovery, with a short local blacklist.

A worker that fails to answer (``WorkerUnavailableError``) is skipped for ``down_for_s`` seconds
even before its discovery lease expires, so new requests go to the survivors at once; it comes
back by itself if it answers again later (a lease that is still refreshed means it is alive).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from tandem.protocols.worker_card import WorkerCard
from tandem.router.errors import NoWorkerError
from tandem.runtime.discovery.base import Discovery, EventKind

logger = logging.getLogger(__name__)


class WorkerPool:
    def __init__(self, discovery: Discovery, down_for_s: float = 5.0) -> None:
        self.discovery = discovery
        self.down_for_s = down_for_s
        self._workers: dict[str, WorkerCard] = {}
        self._down_until: dict[str, float] = {}
        self._watch_task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._listeners: list[tuple[Callable[[WorkerCard], None], Callable[[WorkerCard], None]]] = []

    def add_listener(self, on_added: Callable[[WorkerCard], None], on_removed: Callable[[WorkerCard], None]) -> None:
        """Be told of every worker that appears (including those already known) or leaves."""
        self._listeners.append((on_added, on_removed))
        for card in self._workers.values():
            on_added(card)

    async def start(self) -> None:
        """Load the current set and follow changes in the background. Discovery that cannot be
        reached now (etcd not up yet) is not fatal: the pool starts empty and the watch fills it
        once discovery answers."""
        try:
            cards = await self.discovery.list()
        except ConnectionError as exc:
            logger.warning("discovery unreachable at start (%s); no workers until it answers", exc)
            cards = []
        for card in cards:
            self._workers[card.worker_id] = card
            for on_added, _ in self._listeners:
                on_added(card)
        self._watch_task = asyncio.create_task(self._follow())
        self._ready.set()

    async def stop(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch_task

    async def _follow(self) -> None:
        async for event in self.discovery.watch():
            if event.kind is EventKind.ADDED:
                self._workers[event.card.worker_id] = event.card
                self._down_until.pop(event.card.worker_id, None)
                for on_added, _ in self._listeners:
                    on_added(event.card)
            else:
                self._workers.pop(event.card.worker_id, None)
                for _, on_removed in self._listeners:
                    on_removed(event.card)

    def workers(self, model: str | None = None) -> list[WorkerCard]:
        """Live workers (optionally for one model), minus those recently seen failing."""
        now = time.monotonic()
        return [
            card
            for wid, card in self._workers.items()
            if (model is None or card.model == model) and self._down_until.get(wid, 0.0) <= now
        ]

    def models(self) -> list[str]:
        return sorted({card.model for card in self._workers.values()})

    def candidates(self, model: str, roles: tuple[str, ...] | None = None) -> list[WorkerCard]:
        """Workers to choose from (only those in ``roles`` when given); raises NoWorkerError when
        there are none."""
        found = [card for card in self.workers(model) if roles is None or card.role in roles]
        if not found:
            what = f"{'/'.join(roles)} worker" if roles else "worker"
            raise NoWorkerError(model, f"no {what} serves model {model!r}")
        return found

    def has_role(self, model: str, role: str) -> bool:
        """Whether a live worker of this model has ``role``."""
        return any(card.role == role for card in self.workers(model))

    def mark_down(self, worker_id: str) -> None:
        """Skip this worker for down_for_s (it did not answer)."""
        logger.warning("worker %s unavailable; skipping it for %.1fs", worker_id, self.down_for_s)
        self._down_until[worker_id] = time.monotonic() + self.down_for_s
