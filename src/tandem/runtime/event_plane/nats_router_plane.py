"""A router process's one NATS connection, shared by its KV event followers, and the workers'
latest load metrics (core-NATS ``tandem.{ns}.load.*``, runtime/nats_layout.py).

Connecting happens on first use and is retried until it works; afterwards nats-py reconnects
by itself. Load messages are msgpack maps (never unpickled); one that does not decode into a
map with a string ``worker_id`` is counted in ``load_malformed`` and dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import msgspec
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from tandem.runtime.event_plane import nats_layout

logger = logging.getLogger(__name__)

LOAD_FIELDS = ("num_running", "num_waiting", "kv_usage", "num_free_blocks", "num_total_blocks", "prefix_cache_hit_rate")
"""Load-metric fields the router keeps and shows (of the worker's EngineStats)."""


class NatsRouterPlane:
    def __init__(self, url: str, limits: nats_layout.StreamLimits | None = None) -> None:
        self.url = url
        self.limits = limits or nats_layout.StreamLimits()
        """Used only if this router is the first to need a namespace's stream (workers create it)."""
        self.loads: dict[str, dict[str, Any]] = {}
        """worker id → its latest load metrics, plus ``received_at`` (monotonic seconds)."""
        self.load_malformed = 0
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._connect_lock = asyncio.Lock()
        self._namespace_lock = asyncio.Lock()
        self._namespaces: dict[str, str] = {}  # namespace → its stream, once ensured
        self._load_subs: dict[str, Any] = {}

    async def connection(self) -> NatsClient:
        """The shared connection (connecting on first use, retrying until it works)."""
        async with self._connect_lock:
            if self._nc is None:
                self._nc = await nats_layout.connect_with_retry(self.url, "tandem router")
                self._js = self._nc.jetstream()
                logger.info("router connected to NATS at %s", self.url)
            return self._nc

    async def jetstream(self) -> JetStreamContext:
        """The connection's JetStream context (made once: followers ask for it per message)."""
        await self.connection()
        assert self._js is not None
        return self._js

    async def stream_for(self, namespace: str) -> str:
        """The namespace's KV stream (created if missing); also starts following its load metrics."""
        nc = await self.connection()
        async with self._namespace_lock:
            if namespace not in self._load_subs:
                self._load_subs[namespace] = await nc.subscribe(nats_layout.load_wildcard(namespace), cb=self._on_load)
                await nats_layout.confirm_subscriptions(nc)
            if namespace not in self._namespaces:
                self._namespaces[namespace] = await nats_layout.ensure_stream(
                    await self.jetstream(), namespace, self.limits
                )
        return self._namespaces[namespace]

    async def _on_load(self, msg: Msg) -> None:
        try:
            load = msgspec.msgpack.decode(msg.data)
        except msgspec.DecodeError:
            load = None
        if not isinstance(load, dict) or not isinstance(load.get("worker_id"), str):
            self.load_malformed += 1
            return
        kept = {k: load[k] for k in LOAD_FIELDS if isinstance(load.get(k), (int, float))}
        kept["received_at"] = time.monotonic()
        self.loads[load["worker_id"]] = kept

    def load_of(self, worker_id: str) -> dict[str, Any] | None:
        """Latest load metrics of a worker, with their age in seconds."""
        load = self.loads.get(worker_id)
        if load is None:
            return None
        shown = {k: v for k, v in load.items() if k != "received_at"}
        shown["age_s"] = round(time.monotonic() - load["received_at"], 3)
        return shown

    def forget(self, worker_id: str) -> None:
        self.loads.pop(worker_id, None)

    async def close(self) -> None:
        nc, self._nc, self._js = self._nc, None, None
        if nc is not None:
            try:
                await asyncio.wait_for(nc.close(), 2.0)
            except (TimeoutError, Exception) as exc:
                logger.debug("closing NATS: %r", exc)
