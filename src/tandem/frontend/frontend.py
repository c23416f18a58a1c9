"""The frontend's state: workers from discovery, the routing policy, tokenizers, metrics.

``Frontend`` is what the HTTP app talks to. It follows discovery through a ``WorkerPool``,
remembers every model it has seen (a model whose workers are all gone answers 503, not 404),
polls the workers' stats for ``/metrics`` and ``/health``, and turns a validated request into a
``GenerationSpec``. When the server stops, ``begin_drain`` gives requests in flight
``drain_timeout_s`` to finish; ``until_drained`` ends the rest with a 503 (an SSE error event).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from tandem.frontend.config import FrontendConfig
from tandem.frontend.errors import no_worker, not_found_model, shutting_down
from tandem.frontend.generation import GenerationSpec, OutputChunk
from tandem.frontend.metrics import FrontendMetrics
from tandem.frontend.openai_requests import ChatCompletionRequest, CompletionRequest
from tandem.frontend.preprocess import Tokenizers, prepare_prompt
from tandem.frontend.sampling import stop_strings, to_sampling_params
from tandem.protocols.endpoints import Endpoint
from tandem.protocols.worker_card import WorkerCard
from tandem.router.dispatch.migration import MigratingClient
from tandem.router.dispatch.prefill_router import DisaggConfig, DisaggregatedClient
from tandem.router.dispatch.worker_client import WorkerClient
from tandem.router.policy import RoutingPolicy
from tandem.router.registry import build_policy
from tandem.router.worker_pool import WorkerPool
from tandem.runtime.discovery.base import Discovery
from tandem.runtime.request_plane import RequestPlaneClient, RequestPlaneError

logger = logging.getLogger(__name__)


@dataclass
class ModelInfo:
    name: str
    context_length: int
    tokenizer_source: str


class Frontend:
    def __init__(self, config: FrontendConfig, discovery: Discovery, *, models: list[str] | None = None) -> None:
        """``models``: names to treat as known before any worker registers (503 until one does)."""
        self.config = config
        self.discovery = discovery
        self.pool = WorkerPool(discovery, down_for_s=config.worker_down_s)
        self.client = RequestPlaneClient()
        self.policy = self._make_policy(config)
        self.metrics = FrontendMetrics()
        self.dispatcher = MigratingClient(
            DisaggregatedClient(
                WorkerClient(self.pool, self.policy, self.client, config.max_attempts),
                DisaggConfig(
                    max_local_prefill_length=config.max_local_prefill_length,
                    max_prefill_queue_size=config.max_prefill_queue_size,
                ),
                on_outcome=lambda model, outcome: self.metrics.disagg_requests.labels(model, outcome).inc(),
            ),
            self.pool,
            config.migration_limit,
            on_outcome=lambda model, outcome: self.metrics.migrations.labels(model, outcome).inc(),
            on_limit=lambda model, limit: self.metrics.migration_limit.labels(model).set(limit),
        )
        self.tokenizers = Tokenizers()
        self.metrics.router_stats.status = self.router_status
        self.known_models: set[str] = set(models or [])
        self.worker_stats: dict[str, dict[str, Any]] = {}
        self._poll_task: asyncio.Task[None] | None = None
        self._drain_deadline: float | None = None  # loop time; set once the server is stopping
        self._waits: set[asyncio.Timeout] = set()  # the chunk waits of requests in flight

    def _make_policy(self, config: FrontendConfig) -> RoutingPolicy:
        if config.router == "remote":
            from tandem.router.policies.remote import RemoteRouter

            assert config.router_address is not None  # FrontendConfig refuses remote without one
            return RemoteRouter(self.client, config.router_address)
        from tandem.router.policies.kv import KvRouterConfig

        kv_config = KvRouterConfig(
            overlap_credit=config.kv_overlap_credit,
            prefill_load_scale=config.kv_prefill_load_scale,
            temperature=config.kv_temperature,
            host_credit=config.kv_host_credit,
            disk_credit=config.kv_disk_credit,
            use_kv_events=config.kv_events,
            nats_url=config.nats_url,
        )
        return build_policy(config.router, self.pool, self.client, kv_config)

    def router_status(self) -> dict[str, Any]:
        return self.policy.status(self.pool.workers())

    async def start(self) -> None:
        await self.pool.start()
        if self.config.worker_stats_interval_s > 0:
            self._poll_task = asyncio.create_task(self._poll_worker_stats())

    async def stop(self) -> None:
        await self.policy.stop()
        if self._poll_task is not None:
            self._poll_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poll_task
        await self.pool.stop()
        await self.client.close()
        self.tokenizers.shutdown()

    # --- shutdown ---

    def begin_drain(self) -> None:
        """The server is stopping: requests in flight get ``drain_timeout_s`` more seconds."""
        if self._drain_deadline is None:
            self._drain_deadline = asyncio.get_running_loop().time() + self.config.drain_timeout_s
            for wait in self._waits:
                wait.reschedule(self._drain_deadline)

    async def until_drained(self, chunks: AsyncGenerator[OutputChunk, None]) -> AsyncGenerator[OutputChunk, None]:
        """``chunks``, ended with a 503 (a stream: an error event) when the server stops and the
        drain timeout passes first. Closing it closes ``chunks`` (cancels the worker request)."""
        try:
            while True:
                try:
                    # A timeout per wait (no task per chunk); begin_drain reschedules those pending.
                    async with asyncio.timeout_at(self._drain_deadline) as wait:
                        self._waits.add(wait)
                        try:
                            chunk = await anext(chunks)
                        finally:
                            self._waits.discard(wait)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    if not wait.expired():  # a timeout of the request itself, not the drain
                        raise
                    raise shutting_down(self.config.drain_timeout_s) from None
                yield chunk
        finally:
            await chunks.aclose()

    # --- models and workers ---

    def live_workers(self, model: str | None = None) -> list[WorkerCard]:
        return self.pool.workers(model)

    def models(self) -> list[str]:
        """Models with at least one live worker."""
        return sorted({card.model for card in self.pool.workers()})

    def model_info(self, model: str) -> ModelInfo:
        """The model's serving facts; 404 if never seen, 503 if no live worker serves it now."""
        cards = self.pool.workers(model)
        if cards:
            self.known_models.add(model)
            return ModelInfo(model, min(c.context_length for c in cards), cards[0].tokenizer)
        if model in self.known_models or model in self.pool.models():
            raise no_worker(model)
        raise not_found_model(model)

    async def prepare(self, request: ChatCompletionRequest | CompletionRequest, arrival: float) -> GenerationSpec:
        """Validate against the model, tokenize, and build the engine parameters (OpenAIError on bad input).

        ``arrival``: ``time.perf_counter()`` when the HTTP request arrived (TTFT counts from it)."""
        info = self.model_info(request.model)
        tokenizer = await self.tokenizers.get(info.tokenizer_source)
        prompt = await prepare_prompt(self.tokenizers, tokenizer, request)
        params = to_sampling_params(
            request,
            default_max_tokens=self.config.default_max_tokens,
            context_length=info.context_length,
            prompt_len=len(prompt.token_ids),
        )
        return GenerationSpec(
            model=info.name,
            prompt_token_ids=prompt.token_ids,
            params=params,
            stop=stop_strings(request),
            tokenizer=tokenizer,
            cache_salt=request.cache_salt,
            arrival=arrival,
        )

    # --- worker stats (for /metrics and /health) ---

    async def _poll_worker_stats(self) -> None:
        while True:
            await self.refresh_worker_stats()
            await asyncio.sleep(self.config.worker_stats_interval_s)

    async def refresh_worker_stats(self) -> None:
        await self.policy.refresh()  # a standalone router's status
        cards = self.pool.workers()
        for card in cards:
            self.tokenizers.preload(card.tokenizer)
        results = await asyncio.gather(*(self._stats_of(card) for card in cards))
        fresh = {card.worker_id: stats for card, stats in zip(cards, results, strict=True) if stats is not None}
        self.worker_stats = fresh
        self.metrics.worker_stats.latest = {
            wid: (card.model, fresh[wid]) for card in cards if (wid := card.worker_id) in fresh
        }
        for model in self.known_models | {c.model for c in cards}:
            self.metrics.workers.labels(model).set(sum(c.model == model for c in cards))
            self.metrics.migration_limit.labels(model).set(self.dispatcher.limit_for(model))

    async def _stats_of(self, card: WorkerCard) -> dict[str, Any] | None:
        try:
            stats: dict[str, Any] = await self.client.call(
                card.request_plane_address, Endpoint.STATS, None, timeout=2.0
            )  # the worker's stats endpoint answers a JSON object
            return stats
        except (RequestPlaneError, OSError) as exc:
            logger.debug("stats of %s unavailable: %s", card.worker_id, exc)
            return None

    def health(self) -> dict[str, Any]:
        models: dict[str, list[dict[str, Any]]] = {m: [] for m in sorted(self.known_models)}
        for card in self.pool.workers():
            models.setdefault(card.model, []).append(
                {
                    "worker_id": card.worker_id,
                    "address": card.request_plane_address,
                    "role": card.role,
                    "engine": card.engine,
                    "context_length": card.context_length,
                    "kv_node_tier": card.kv_node_tier,
                    "stats": self.worker_stats.get(card.worker_id),
                }
            )
        ready = any(models.values())
        return {"status": "ready" if ready else "no_workers", "models": models}
