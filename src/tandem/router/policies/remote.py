"""``--router remote``: a frontend's handle on a standalone ``tandem router`` (router_service.py).

Routing decisions and the request's progress travel over the request plane; when the router
cannot answer, the request goes to a random candidate (with a warning) rather than failing.
"""

from __future__ import annotations

import logging
import random
from typing import Any

from tandem.protocols.worker_card import WorkerCard
from tandem.router.policy import RoutingPolicy
from tandem.runtime.background import spawn
from tandem.runtime.request_plane import RequestPlaneClient, RequestPlaneError

logger = logging.getLogger(__name__)


class RemoteRouter(RoutingPolicy):
    """A frontend's handle on a standalone router: the same hooks as an embedded policy."""

    name = "remote"

    def __init__(self, client: RequestPlaneClient, address: str) -> None:
        self.client, self.address = client, address
        self.last_status: dict[str, Any] = {"policy": "remote", "address": address}

    def select(self, candidates: list[WorkerCard], token_ids: list[int]) -> WorkerCard:
        raise RuntimeError("RemoteRouter routes asynchronously: use choose()")

    async def choose(
        self, candidates: list[WorkerCard], token_ids: list[int], request_id: str | None, cache_salt: str | None
    ) -> WorkerCard:
        """The router's choice; a random candidate (and a warning) when the router cannot answer."""
        try:
            reply = await self.client.call(
                self.address,
                "route",
                {
                    "model": candidates[0].model,
                    "token_ids": token_ids,
                    "request_id": request_id,
                    "cache_salt": cache_salt,
                    "candidates": [c.worker_id for c in candidates],
                },
                timeout=5.0,
            )
            return next(c for c in candidates if c.worker_id == reply["worker_id"])
        except (RequestPlaneError, StopIteration, KeyError, TypeError) as exc:
            logger.warning("router %s did not answer (%s); routing at random", self.address, exc)
            return random.choice(candidates)

    def on_first_token(self, request_id: str) -> None:
        self._tell("first_token", request_id)

    def on_finished(self, request_id: str) -> None:
        self._tell("finished", request_id)

    def _tell(self, endpoint: str, request_id: str) -> None:
        async def send() -> None:
            try:
                await self.client.call(self.address, endpoint, {"request_id": request_id}, timeout=5.0)
            except Exception as exc:  # bookkeeping; the router expires stale entries itself
                logger.debug("router %s %s failed: %s", self.address, endpoint, exc)

        spawn(send())

    async def refresh(self) -> None:
        try:
            self.last_status = {
                "address": self.address,
                **await self.client.call(self.address, "status", None, timeout=2.0),
            }
        except Exception as exc:  # status is informational
            self.last_status = {"policy": "remote", "address": self.address, "error": str(exc)}

    def status(self, cards: list[WorkerCard]) -> dict[str, Any]:
        return self.last_status
