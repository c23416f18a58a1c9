"""A standalone router (`tandem router`): one KV index and load book that several frontends share.

The router follows discovery and the workers' KV events like an embedded one, and answers on the
request plane:

* ``route`` ``{model, token_ids, request_id, cache_salt, candidates?}`` → ``{worker_id}``: the
  chosen worker among the live workers of the model (or among ``candidates``, the worker ids the
  frontend can still use), booked under ``request_id``;
* ``first_token`` / ``finished`` ``{request_id}``: release the booked prefill / everything;
* ``status``: the policy's status (as ``/router/status``);
* ``overlap`` ``{token_ids, cache_salt?}`` → ``{worker_id: matched_blocks}``: how many leading
  blocks of the prompt each worker holds according to this router's index (workers with none are
  left out), like Dynamo's ``get_overlap_scores``; ``kv`` policy only. Tests and benchmarks
  compare router replicas' indexes with it.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator
from typing import Any

from tandem.router.factory import build_policy
from tandem.router.kv_router import KvRouterConfig
from tandem.router.worker_pool import WorkerPool
from tandem.runtime.discovery.base import Discovery
from tandem.runtime.request_plane import (
    EndpointError,
    RequestContext,
    RequestPlaneClient,
    RequestPlaneError,
    RequestPlaneServer,
)

logger = logging.getLogger(__name__)


class RouterService:
    def __init__(self, discovery: Discovery, *, policy: str = "kv", config: KvRouterConfig | None = None,
                 host: str = "127.0.0.1", port: int = 0) -> None:
        self.pool = WorkerPool(discovery)
        self.client = RequestPlaneClient()
        if policy not in ("kv", "least-loaded"):
            raise ValueError(f"a standalone router runs 'kv' or 'least-loaded', not {policy!r}")
        self.policy: Any = build_policy(policy, self.pool, self.client, config)
        self.server = RequestPlaneServer(host, port)
        for name in ("route", "first_token", "finished", "status", "overlap"):
            self.server.register(name, getattr(self, f"_{name}"))

    @property
    def address(self) -> str:
        return self.server.address

    async def start(self) -> None:
        await self.pool.start()
        await self.server.start()

    async def stop(self) -> None:
        await self.server.stop(0)
        stop = getattr(self.policy, "stop", None)
        if stop is not None:
            await stop()
        await self.pool.stop()
        await self.client.close()

    async def _route(self, payload: Any, ctx: RequestContext) -> AsyncIterator[dict]:
        if not isinstance(payload, dict) or not isinstance(payload.get("token_ids"), list):
            raise EndpointError("bad_request", "route needs {model, token_ids, request_id}")
        cards = self.pool.workers(payload.get("model"))
        allowed = payload.get("candidates")
        if allowed is not None:
            cards = [c for c in cards if c.worker_id in set(allowed)]
        if not cards:
            raise EndpointError("not_found", f"no live worker serves model {payload.get('model')!r}")
        card = self.policy.route(cards, payload["token_ids"], payload.get("request_id"), payload.get("cache_salt"))
        yield {"worker_id": card.worker_id}

    async def _first_token(self, payload: Any, ctx: RequestContext) -> AsyncIterator[dict]:
        self.policy.on_first_token(str(payload.get("request_id")))
        yield {}

    async def _finished(self, payload: Any, ctx: RequestContext) -> AsyncIterator[dict]:
        self.policy.on_finished(str(payload.get("request_id")))
        yield {}

    async def _status(self, payload: Any, ctx: RequestContext) -> AsyncIterator[dict]:
        status = getattr(self.policy, "status", None)
        yield status(self.pool.workers()) if status else {"policy": self.policy.name}


    async def _overlap(self, payload: Any, ctx: RequestContext) -> AsyncIterator[dict]:
        indexer = getattr(self.policy, "indexer", None)
        if indexer is None:
            raise EndpointError("not_found", f"policy {self.policy.name!r} keeps no KV index")
        token_ids = payload.get("token_ids") if isinstance(payload, dict) else None
        salt = payload.get("cache_salt") if isinstance(payload, dict) else None
        if not isinstance(token_ids, list) or not all(isinstance(t, int) and t >= 0 for t in token_ids) \
                or not (salt is None or isinstance(salt, str)):
            raise EndpointError("bad_request", "overlap needs {token_ids: [int], cache_salt?: str}")
        yield indexer.find_matches(indexer.sequence_hashes(token_ids, salt))


class RemoteRouter:
    """A frontend's handle on a standalone router: the same hooks as an embedded policy."""

    name = "remote"

    def __init__(self, client: RequestPlaneClient, address: str) -> None:
        self.client, self.address = client, address
        self.last_status: dict[str, Any] = {"policy": "remote", "address": address}

    def select(self, candidates, token_ids):  # noqa: ANN001, ANN201 - only route() is used
        raise RuntimeError("RemoteRouter routes asynchronously: use route()")

    async def route(self, candidates, token_ids: list[int], request_id: str | None, cache_salt: str | None):  # noqa: ANN001, ANN201
        """The router's choice; a random candidate (and a warning) when the router cannot answer."""
        try:
            reply = await self.client.call(self.address, "route", {
                "model": candidates[0].model, "token_ids": token_ids, "request_id": request_id,
                "cache_salt": cache_salt, "candidates": [c.worker_id for c in candidates]}, timeout=5.0)
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
            except Exception as exc:  # noqa: BLE001 - bookkeeping; the router expires stale entries itself
                logger.debug("router %s %s failed: %s", self.address, endpoint, exc)

        asyncio.ensure_future(send())

    async def refresh(self) -> None:
        try:
            self.last_status = {"address": self.address, **await self.client.call(self.address, "status", None,
                                                                                   timeout=2.0)}
        except Exception as exc:  # noqa: BLE001 - status is informational
            self.last_status = {"policy": "remote", "address": self.address, "error": str(exc)}

    def status(self, cards) -> dict[str, Any]:  # noqa: ANN001
        return self.last_status
