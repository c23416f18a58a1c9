"""The worker service: an engine (builtin `AsyncEngine` or `VllmEngine`) behind the request plane,
registered in discovery.

Endpoints: ``generate`` (stream of GenerateDelta; leaving the stream aborts the request and
frees its KV blocks), ``health`` (see `WorkerService.health`), ``stats`` (the engine's latest
EngineStats, plus held KV exports and imported blocks), ``kv_release`` and ``kv_dump``. Only
``generate`` is refused while draining. ``start()`` binds the request plane, then registers the
worker card; ``drain()`` shuts down gracefully (its docstring lists the steps).

If the engine thread dies, every in-flight and new stream fails with code ``unavailable`` (the
frontend moves it to another worker), the card is withdrawn at once, and ``engine_failed`` is set:
the process should drain briefly and exit non-zero (see `tandem.worker.lifecycle`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from tandem.engine.async_engine import AsyncEngine, EngineDeadError, EngineStepError
from tandem.engine.outputs import RequestOutput
from tandem.engine.served_engine import ServedEngine
from tandem.engine.vllm.engine import VllmEngine
from tandem.protocols.endpoints import (
    Endpoint,
    GenerateDelta,
    GenerateRequest,
    HealthReply,
    KvDumpReply,
    KvReleaseReply,
    KvReleaseRequest,
    StatsReply,
    TokenLogprobPayload,
    sampling_params_from_payload,
)
from tandem.protocols.worker_card import EngineKind, Role, WorkerCard
from tandem.runtime.discovery.base import Discovery, Registration, register_when_reachable
from tandem.runtime.event_plane.zmq_publisher import KvEventPublisher
from tandem.runtime.request_plane import EndpointError, RequestContext, RequestPlaneServer
from tandem.worker import vllm_disagg
from tandem.worker.disagg import PrefillExporter, export_on_finish, import_missing_blocks

logger = logging.getLogger(__name__)

DRAINED_MESSAGE = "worker drained; migrate"
"""Error message (code ``unavailable``) of the streams still running when a drain times out."""
WITHDRAW_TIMEOUT_S = 5.0
"""Longest wait for discovery to remove the card; past it the lease expires on its own."""


class WorkerService:
    def __init__(
        self,
        engine: ServedEngine,
        discovery: Discovery,
        *,
        model_name: str,
        tokenizer_source: str,
        role: Role = "agg",
        engine_kind: EngineKind = "builtin",
        host: str = "127.0.0.1",
        port: int = 0,
        ttl_s: float | None = None,
        worker_id: str | None = None,
        kv_publisher: KvEventPublisher | None = None,
        kv_hold_s: float = 60.0,
        metrics_address: str | None = None,
        discovery_wait_s: float = 0.0,
    ) -> None:
        self.engine = engine
        self.discovery = discovery
        self.model_name, self.tokenizer_source = model_name, tokenizer_source
        self.role, self.engine_kind, self.ttl_s = role, engine_kind, ttl_s
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.server = RequestPlaneServer(host, port)
        self.server.register(Endpoint.GENERATE, self.generate)
        for name, control in (
            (Endpoint.HEALTH, self.health),
            (Endpoint.STATS, self.stats),
            (Endpoint.KV_DUMP, self.kv_dump),
            (Endpoint.KV_RELEASE, self.kv_release),
        ):
            self.server.register(name, control, while_draining=True)
        self.kv_publisher = kv_publisher
        self.metrics_address = metrics_address
        """URL of this process's Prometheus /metrics page (``--metrics-port``), for the card."""
        self.builtin = engine if isinstance(engine, AsyncEngine) else None
        """The engine when it is the builtin one (the worker exports and imports its KV itself)."""
        self.vllm = engine if isinstance(engine, VllmEngine) else None
        """The engine when it is vLLM (its KV connector exports and imports: worker/vllm_disagg.py)."""
        # Prefill workers hold finished prompts' KV for decode workers (worker/disagg.py).
        self.exporter = PrefillExporter(self.builtin, host, kv_hold_s) if self.builtin and role == "prefill" else None
        self.kv_blocks_imported = 0
        """Blocks pulled from prefill workers and imported (decode side), since start."""
        self.registration: Registration | None = None
        self.discovery_wait_s = discovery_wait_s
        """How long ``start`` waits for unreachable discovery (etcd not up yet) before failing."""
        self.engine_failed = asyncio.Event()
        """Set once the engine thread died and the card was withdrawn (the process should exit)."""
        self._draining = False
        self._started_at = time.monotonic()
        self._engine_watch: asyncio.Task[None] | None = None

    @property
    def status(self) -> str:
        """``ok``, ``draining`` (shutting down) or ``failed`` (the engine died)."""
        if self.engine.failure is not None:
            return "failed"
        return "draining" if self._draining else "ok"

    def card(self) -> WorkerCard:
        engine = self.engine
        return WorkerCard(
            worker_id=self.worker_id,
            model=self.model_name,
            tokenizer=self.tokenizer_source,
            chat_template=self.tokenizer_source,
            context_length=engine.max_model_len,
            block_size=engine.block_size,
            total_kv_blocks=engine.num_kv_blocks,
            role=self.role,
            request_plane_address=self.server.address,
            engine=self.engine_kind,
            kv_events_address=self.kv_publisher.address if self.kv_publisher else None,
            kv_replay_address=self.kv_publisher.replay_address if self.kv_publisher else None,
            kv_events_subject=getattr(self.kv_publisher, "subject", None),
            metrics_address=self.metrics_address,
            kv_node_tier=self._kv_node_tier(),
        )

    def _kv_node_tier(self) -> str | None:
        """``<host>/<name>`` of the node-wide host tier the engine shares, if it does."""
        tiers = self.builtin.core.tiers if self.builtin is not None else None
        name = tiers.node_tier_name if tiers is not None else None
        return f"{socket.gethostname()}/{name}" if name else None

    async def start(self) -> None:
        if self.exporter is not None:
            await self.exporter.start()
        await self.server.start()
        self._started_at = time.monotonic()
        self._engine_watch = asyncio.create_task(self._watch_engine(), name=f"engine watch {self.worker_id}")
        self.registration = await register_when_reachable(
            self.discovery, self.card(), self.ttl_s, self.discovery_wait_s
        )
        logger.info("worker %s serving %s at %s", self.worker_id, self.model_name, self.server.address)

    async def drain(self, timeout: float = 30.0, grace: float = 0.0) -> None:
        """Graceful shutdown, in this order:

        1. withdraw the card from discovery (routers stop sending here);
        2. keep serving for ``grace`` seconds: requests routed on a stale view still run;
        3. refuse new requests with code ``unavailable`` (the frontend retries them elsewhere);
        4. let in-flight streams finish for up to ``timeout`` seconds; end the rest with code
           ``unavailable``, "worker drained; migrate" (the frontend migrates them);
        5. a prefill worker waits, within the same ``timeout``, until its held KV exports are
           pulled or released;
        6. close the request plane and stop the engine.

        ``health`` answers ``draining`` throughout. With a dead engine, step 2 is skipped."""
        self._draining = True
        started = time.monotonic()
        deadline = started + grace + timeout
        await self._withdraw()
        if grace > 0 and self.engine.failure is None:
            await asyncio.sleep(grace)
        self.server.start_draining()
        logger.info(
            "worker %s: withdrawn; refusing new requests, %d in flight", self.worker_id, self.server.num_inflight
        )
        if not await self.server.wait_drained(max(0.0, deadline - time.monotonic())):
            logger.warning(
                "worker %s: %d streams still running after the %.1fs drain timeout; ending them",
                self.worker_id,
                self.server.num_inflight,
                timeout,
            )
            await self.server.end_streams("unavailable", DRAINED_MESSAGE)
        if self.exporter is not None:
            await self._wait_for_exports(deadline)
        await self.server.close()
        if self._engine_watch is not None:
            self._engine_watch.cancel()
        if self.exporter is not None:
            await self.exporter.stop()
        await asyncio.to_thread(self.engine.shutdown)
        if self.kv_publisher is not None:
            self.kv_publisher.close()
        logger.info("worker %s: drained in %.2fs", self.worker_id, time.monotonic() - started)

    async def _wait_for_exports(self, deadline: float) -> None:
        """Wait until every held KV export was pulled or released, or until ``deadline``."""
        assert self.exporter is not None
        while len(self.exporter.store) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if len(self.exporter.store):
            logger.warning("worker %s: dropping %d KV exports nobody pulled", self.worker_id, len(self.exporter.store))

    async def _withdraw(self) -> None:
        """Remove the card from discovery now (idempotent); a failure is logged, not raised."""
        if self.registration is None:
            return
        try:
            await asyncio.wait_for(self.registration.withdraw(), WITHDRAW_TIMEOUT_S)
        except Exception as exc:  # discovery away: the lease expires by itself
            logger.warning(
                "worker %s: could not withdraw from discovery (%r); its lease will expire", self.worker_id, exc
            )

    async def _watch_engine(self) -> None:
        """On engine death: refuse new requests, withdraw the card, set ``engine_failed``.
        (In-flight streams already fail: the engine hands them EngineDeadError.)"""
        cause = await self.engine.wait_stopped()
        if cause is None:
            return  # a requested shutdown
        logger.error("worker %s: engine failed (%s); withdrawing from discovery", self.worker_id, cause)
        self.server.start_draining(f"engine failed: {cause}")
        await self._withdraw()
        self.engine_failed.set()

    async def health(self, payload: Any, ctx: RequestContext) -> dict[str, Any]:
        """``{status, worker_id, model, role, engine_alive, num_running, num_waiting, uptime_s}``;
        status is ``ok``, ``draining`` or ``failed``. Answered while draining too."""
        stats = self.engine.stats()
        reply: dict[str, Any] = msgspec.to_builtins(
            HealthReply(
                status=self.status,
                worker_id=self.worker_id,
                model=self.model_name,
                role=self.role,
                engine_alive=self.engine.is_running,
                num_running=stats.num_running,
                num_waiting=stats.num_waiting,
                uptime_s=round(time.monotonic() - self._started_at, 3),
                kv_tiers=stats.tiers,
            )
        )
        return reply

    async def generate(self, payload: Any, ctx: RequestContext) -> AsyncIterator[dict[str, Any]]:
        try:
            request = msgspec.convert(payload, GenerateRequest)
            params = sampling_params_from_payload(request.sampling)
        except (msgspec.ValidationError, ValueError, TypeError) as exc:
            raise EndpointError("bad_request", str(exc)) from None
        try:
            self.engine.validate_prompt(request.token_ids)
        except ValueError as exc:
            raise EndpointError("bad_request", str(exc)) from None
        if request.export_kv and self.role != "prefill":
            raise EndpointError("bad_request", f"export_kv needs a prefill worker; this one is {self.role!r}")
        if request.kv_transfer is not None and self.builtin is not None:
            prompt = request.token_ids[:-1]  # the last token is the prefill's first output
            try:
                self.kv_blocks_imported += await import_missing_blocks(
                    self.builtin, prompt, request.cache_salt, request.kv_transfer
                )
            except EngineDeadError as exc:
                raise EndpointError("unavailable", str(exc)) from None
        if self.vllm is not None:
            kv_params = None
            if request.export_kv:
                kv_params = vllm_disagg.export_params(request.request_id)
            elif request.kv_transfer is not None:
                kv_params = vllm_disagg.pull_params(request.kv_transfer)
            stream = self.vllm.generate(
                request.token_ids,
                params,
                request_id=request.request_id,
                cache_salt=request.cache_salt,
                prompt_validated=True,
                kv_transfer_params=kv_params,
            )
        else:
            on_finish = export_on_finish(request.token_ids, request.cache_salt) if request.export_kv else None
            stream = self.engine.generate(
                request.token_ids,
                params,
                request_id=request.request_id,
                cache_salt=request.cache_salt,
                on_finish=on_finish,
                prompt_validated=True,
            )
        try:
            async for out in stream:
                delta = delta_from_output(out)
                if request.export_kv and out.finish_reason is not None:
                    if self.exporter is not None:
                        delta.kv_transfer = self.exporter.hold(
                            request.request_id, out.on_finish_result, self.server.address
                        )
                    else:  # vLLM's connector holds the blocks
                        delta.kv_transfer = vllm_disagg.held_transfer(out.kv_transfer_params, self.server.address)
                yield msgspec.to_builtins(delta)
        except ValueError as exc:  # the engine refused the request (e.g. a duplicate id)
            raise EndpointError("bad_request", str(exc)) from None
        except (EngineDeadError, EngineStepError) as exc:  # another worker can serve it: the frontend migrates it
            raise EndpointError("unavailable", str(exc)) from None
        finally:
            await stream.aclose()  # aborts the engine request if the client went away early

    async def kv_release(self, payload: Any, ctx: RequestContext) -> dict[str, Any]:
        """Free a held prefill export nobody will pull (``{"transfer_id": ...}``)."""
        try:
            request = msgspec.convert(payload, KvReleaseRequest)
        except msgspec.ValidationError:
            raise EndpointError("bad_request", "kv_release needs {'transfer_id': str}") from None
        released = self.exporter.release(request.transfer_id) if self.exporter else False
        reply: dict[str, Any] = msgspec.to_builtins(KvReleaseReply(released))
        return reply

    async def stats(self, payload: Any, ctx: RequestContext) -> dict[str, Any]:
        """The engine's EngineStats, plus this worker's disaggregation figures:
        ``kv_exports_held`` (prefill exports waiting for a pull; 0 on other roles) and
        ``kv_blocks_imported`` (blocks pulled from prefill workers since start)."""
        held = len(self.exporter.store) if self.exporter is not None else 0
        imported = self.kv_blocks_imported
        if self.vllm is not None:  # vLLM's KV connector imports, not this service
            imported = self.vllm.kv_blocks_loaded
        reply = StatsReply(
            **msgspec.structs.asdict(self.engine.stats()),
            kv_exports_held=held,
            kv_blocks_imported=imported,
        )
        builtins: dict[str, Any] = msgspec.to_builtins(reply)
        return builtins

    async def kv_dump(self, payload: Any, ctx: RequestContext) -> dict[str, Any]:
        """Every block this worker holds, as BlockStored events, and the seq they are current as of."""
        if self.kv_publisher is None:
            raise EndpointError("not_found", "this worker publishes no KV events")
        seq, events = self.kv_publisher.dump()
        reply: dict[str, Any] = msgspec.to_builtins(KvDumpReply(seq, events))
        return reply


def delta_from_output(out: RequestOutput) -> GenerateDelta:
    """The wire form of one engine output."""
    logprobs = None
    if out.logprobs is not None:
        logprobs = [TokenLogprobPayload(lp.token_id, lp.logprob, list(lp.top_logprobs)) for lp in out.logprobs]
    return GenerateDelta(
        out.new_token_ids,
        out.num_prompt_tokens,
        out.num_cached_tokens,
        out.num_output_tokens,
        out.finish_reason,
        out.stop_token_id,
        logprobs,
    )
