"""Send one generation to a worker: pick it with the routing policy, stream its deltas, retry.

A worker that cannot be reached (or goes away before sending anything) is marked down in the
pool and the request goes to the next candidate, up to ``max_attempts`` workers. Once tokens
have flowed, a lost worker (connection lost or timed out, the worker shutting down, the stream
ending unfinished) raises :class:`StreamBrokenError`; :mod:`tandem.router.dispatch.migration` moves the
request to another worker from there. Other failures are :mod:`tandem.router.errors`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass

import msgspec

from tandem.protocols.endpoints import Endpoint, GenerateDelta, GenerateRequest
from tandem.router.errors import NoWorkerError, WorkerFailedError, WorkerRejectedError
from tandem.router.policy import RoutingPolicy
from tandem.router.worker_pool import WorkerPool
from tandem.runtime.request_plane import RemoteError, RequestPlaneClient, WorkerUnavailableError

logger = logging.getLogger(__name__)

SERVING_ROLES = ("agg", "decode")
"""Workers that run whole requests (a prefill worker only runs the prefill half)."""


class StreamBrokenError(Exception):
    """The worker went away after the request had started streaming."""

    def __init__(self, worker_id: str, reason: str) -> None:
        super().__init__(f"worker {worker_id} was lost mid-stream: {reason}")
        self.worker_id = worker_id
        self.reason = reason


@dataclass
class RoutedStream:
    worker_id: str
    deltas: AsyncIterator[GenerateDelta]


class WorkerClient:
    def __init__(
        self, pool: WorkerPool, policy: RoutingPolicy, client: RequestPlaneClient, max_attempts: int = 3
    ) -> None:
        self.pool, self.policy, self.client = pool, policy, client
        self.max_attempts = max_attempts

    async def generate(
        self,
        model: str,
        request: GenerateRequest,
        roles: tuple[str, ...] = SERVING_ROLES,
        exclude: frozenset[str] = frozenset(),
    ) -> AsyncGenerator[GenerateDelta, None]:
        """Stream the request's deltas from a worker with one of ``roles`` (never one in
        ``exclude``). Raises NoWorkerError when no worker is left, WorkerRejectedError when the
        worker refused the request, WorkerFailedError, or StreamBrokenError mid-stream.

        Closing the iterator early cancels the request on the worker (its KV blocks are freed).
        """
        payload = msgspec.to_builtins(request)
        tried: set[str] = set(exclude)
        for _ in range(self.max_attempts):
            try:
                candidates = [c for c in self.pool.candidates(model, roles) if c.worker_id not in tried]
            except NoWorkerError:
                raise NoWorkerError(model) from None
            if not candidates:
                break
            card = await self.policy.choose(candidates, request.token_ids, request.request_id, request.cache_salt)
            tried.add(card.worker_id)
            started = finished = False
            items = self.client.stream_batches(card.request_plane_address, Endpoint.GENERATE, payload)
            try:
                async for batch in items:
                    if not started:
                        self.policy.on_first_token(request.request_id)
                    started = True
                    # Deltas that queued up while this stream waited are handed out as one.
                    delta = msgspec.convert(batch[0], GenerateDelta)
                    for item in batch[1:]:
                        delta = delta.merge(msgspec.convert(item, GenerateDelta))
                    finished = delta.finish_reason is not None
                    yield delta
                if started and not finished:
                    raise StreamBrokenError(card.worker_id, "the stream ended before the request finished")
                return
            except (WorkerUnavailableError, RemoteError) as exc:
                if isinstance(exc, RemoteError) and exc.code != "unavailable":  # it answered: not lost
                    if exc.code == "bad_request":
                        raise WorkerRejectedError(exc.message) from None
                    raise WorkerFailedError(f"worker {card.worker_id} failed: {exc.message}") from None
                if finished:
                    return  # the request already finished; only the stream's end marker was lost
                self.pool.mark_down(card.worker_id)
                if started:
                    raise StreamBrokenError(card.worker_id, str(exc)) from None
                logger.warning("worker %s unavailable (%s); trying another", card.worker_id, exc)
            finally:
                await items.aclose()
                self.policy.on_finished(request.request_id)
        logger.warning("no worker serving %s answered (tried %d)", model, len(tried))
        raise NoWorkerError(model)
