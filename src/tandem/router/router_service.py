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

import logging
from collections.abc import AsyncIterator
from typing import Any

from tandem.router.policies.kv import KvRouter, KvRouterConfig
from tandem.router.policy import RoutingPolicy
from tandem.router.registry import build_policy
from tandem.router.worker_pool import WorkerPool
from tandem.runtime.discovery.base import Discovery
from tandem.runtime.request_plane import (
    EndpointError,
    RequestContext,
    RequestPlaneClient,
    RequestPlaneServer,
)

logger = logging.getLogger(__name__)


class RouterService:
    def __init__(
        self,
        discovery: Discovery,
        *,
        policy: str = "kv",
        config: KvRouterConfig | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.pool = WorkerPool(discovery)
        self.client = RequestPlaneClient()
        if policy not in ("kv", "least-loaded"):
            raise ValueError(f"a standalone router runs 'kv' or 'least-loaded', not {policy!r}")
        self.policy: RoutingPolicy = build_policy(policy, self.pool, self.client, config)
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
        await self.policy.stop()
        await self.pool.stop()
        await self.client.close()

    async def _route(self, payload: Any, ctx: RequestContext) -> AsyncIterator[dict[str, Any]]:
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

    async def _first_token(self, payload: Any, ctx: RequestContext) -> AsyncIterator[dict[str, Any]]:
        self.policy.on_first_token(str(payload.get("request_id")))
        yield {}

    async def _finished(self, payload: Any, ctx: RequestContext) -> AsyncIterator[dict[str, Any]]:
        self.policy.on_finished(str(payload.get("request_id")))
        yield {}

    async def _status(self, payload: Any, ctx: RequestContext) -> AsyncIterator[dict[str, Any]]:
        yield self.policy.status(self.pool.workers())

    async def _overlap(self, payload: Any, ctx: RequestContext) -> AsyncIterator[dict[str, Any]]:
        indexer = self.policy.indexer if isinstance(self.policy, KvRouter) else None
        if indexer is None:
            raise EndpointError("not_found", f"policy {self.policy.name!r} keeps no KV index")
        token_ids = payload.get("token_ids") if isinstance(payload, dict) else None
        salt = payload.get("cache_salt") if isinstance(payload, dict) else None
        if (
            not isinstance(token_ids, list)
            or not all(isinstance(t, int) and t >= 0 for t in token_ids)
            or not (salt is None or isinstance(salt, str))
        ):
            raise EndpointError("bad_request", "overlap needs {token_ids: [int], cache_salt?: str}")
        yield indexer.find_matches(indexer.sequence_hashes(token_ids, salt))
