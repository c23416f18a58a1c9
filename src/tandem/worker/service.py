"""The worker service: an AsyncEngine behind the request plane, registered in discovery.

Endpoints: ``generate`` (stream of GenerateDelta; leaving the stream aborts the request and
frees its KV blocks), ``stats`` (the engine's latest EngineStats, plus held KV exports and imported
blocks), ``kv_release`` and ``kv_dump``. ``start()`` binds the request plane, then registers the
worker card; ``drain()`` withdraws the card first (so routers stop sending), lets in-flight streams
finish up to a timeout, then stops the engine.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

import msgspec

from tandem.engine.async_engine import AsyncEngine
from tandem.runtime.discovery import Discovery, Registration
from tandem.runtime.request_plane import EndpointError, RequestContext, RequestPlaneServer
from tandem.runtime.worker_card import Role, WorkerCard
from tandem.worker.disagg import PrefillExporter, export_on_finish, import_missing_blocks
from tandem.worker.kv_publisher import KvEventPublisher
from tandem.worker.protocol import GenerateDelta, GenerateRequest, sampling_params_from_payload

logger = logging.getLogger(__name__)


class WorkerService:
    def __init__(self, engine: AsyncEngine, discovery: Discovery, *, model_name: str, tokenizer_source: str,
                 role: Role = "agg", engine_kind: str = "builtin", host: str = "127.0.0.1", port: int = 0,
                 ttl_s: float | None = None, worker_id: str | None = None,
                 kv_publisher: KvEventPublisher | None = None, kv_hold_s: float = 60.0,
                 metrics_address: str | None = None) -> None:
        self.engine = engine
        self.discovery = discovery
        self.model_name, self.tokenizer_source = model_name, tokenizer_source
        self.role, self.engine_kind, self.ttl_s = role, engine_kind, ttl_s
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{id(self):x}"
        self.server = RequestPlaneServer(host, port)
        self.server.register("generate", self.generate)
        self.server.register("stats", self.stats)
        self.server.register("kv_dump", self.kv_dump)
        self.server.register("kv_release", self.kv_release)
        self.kv_publisher = kv_publisher
        self.metrics_address = metrics_address
        """URL of this process's Prometheus /metrics page (``--metrics-port``), for the card."""
        # Prefill workers hold finished prompts' KV for decode workers (worker/disagg.py).
        self.exporter = PrefillExporter(engine, host, kv_hold_s) if role == "prefill" else None
        self.kv_blocks_imported = 0
        """Blocks pulled from prefill workers and imported (decode side), since start."""
        self.registration: Registration | None = None

    def card(self) -> WorkerCard:
        core = self.engine.engine
        return WorkerCard(
            worker_id=self.worker_id, model=self.model_name, tokenizer=self.tokenizer_source,
            chat_template=self.tokenizer_source, context_length=core.max_model_len, block_size=core.block_size,
            total_kv_blocks=core.pool.num_blocks, role=self.role, request_plane_address=self.server.address,
            engine=self.engine_kind,
            kv_events_address=self.kv_publisher.address if self.kv_publisher else None,
            kv_replay_address=self.kv_publisher.replay_address if self.kv_publisher else None,
            metrics_address=self.metrics_address,
        )

    async def start(self) -> None:
        if self.exporter is not None:
            await self.exporter.start()
        await self.server.start()
        self.registration = await self.discovery.register(self.card(), self.ttl_s)
        logger.info("worker %s serving %s at %s", self.worker_id, self.model_name, self.server.address)

    async def drain(self, timeout: float = 30.0) -> None:
        """Withdraw from discovery, finish in-flight streams (up to timeout), stop the engine."""
        if self.registration is not None:
            await self.registration.withdraw()
        await self.server.stop(drain_timeout=timeout)
        if self.exporter is not None:
            await self.exporter.stop()
        await asyncio.to_thread(self.engine.shutdown)
        if self.kv_publisher is not None:
            self.kv_publisher.close()

    async def generate(self, payload: Any, ctx: RequestContext) -> AsyncIterator[dict]:
        try:
            request = msgspec.convert(payload, GenerateRequest)
            params = sampling_params_from_payload(request.sampling)
        except (msgspec.ValidationError, ValueError, TypeError) as exc:
            raise EndpointError("bad_request", str(exc)) from None
        try:
            self.engine.engine.validate_prompt(request.token_ids)
        except ValueError as exc:
            raise EndpointError("bad_request", str(exc)) from None
        if request.export_kv and self.exporter is None:
            raise EndpointError("bad_request", f"export_kv needs a prefill worker; this one is {self.role!r}")
        if request.kv_transfer is not None:
            prompt = request.token_ids[:-1]  # the last token is the prefill's first output
            self.kv_blocks_imported += await import_missing_blocks(self.engine, prompt, request.cache_salt,
                                                                   request.kv_transfer)
        on_finish = export_on_finish(request.token_ids, request.cache_salt) if request.export_kv else None
        stream = self.engine.generate(request.token_ids, params, request_id=request.request_id,
                                      cache_salt=request.cache_salt, on_finish=on_finish)
        try:
            async for out in stream:
                delta = GenerateDelta.from_output(out)
                if request.export_kv and out.finish_reason is not None:
                    delta.kv_transfer = self.exporter.hold(request.request_id, out.on_finish_result,
                                                           self.server.address)
                yield msgspec.to_builtins(delta)
        except ValueError as exc:  # the engine refused the request (e.g. a duplicate id)
            raise EndpointError("bad_request", str(exc)) from None
        finally:
            await stream.aclose()  # aborts the engine request if the client went away early

    async def kv_release(self, payload: Any, ctx: RequestContext) -> dict:
        """Free a held prefill export nobody will pull (``{"transfer_id": ...}``)."""
        transfer_id = payload.get("transfer_id") if isinstance(payload, dict) else None
        if not isinstance(transfer_id, str):
            raise EndpointError("bad_request", "kv_release needs {'transfer_id': str}")
        return {"released": self.exporter.release(transfer_id) if self.exporter else False}

    async def stats(self, payload: Any, ctx: RequestContext) -> dict:
        """The engine's EngineStats, plus this worker's disaggregation figures:
        ``kv_exports_held`` (prefill exports waiting for a pull; 0 on other roles) and
        ``kv_blocks_imported`` (blocks pulled from prefill workers since start)."""
        stats = asdict(self.engine.stats())
        stats["kv_exports_held"] = len(self.exporter.store) if self.exporter is not None else 0
        stats["kv_blocks_imported"] = self.kv_blocks_imported
        return stats

    async def kv_dump(self, payload: Any, ctx: RequestContext) -> dict:
        """Every block this worker holds, as BlockStored events, and the seq they are current as of."""
        if self.kv_publisher is None:
            raise EndpointError("not_found", "this worker publishes no KV events")
        seq, events = self.kv_publisher.dump()
        return {"seq": seq, "events": msgspec.to_builtins(events)}
