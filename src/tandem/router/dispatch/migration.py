"""Request migration: a request whose worker is lost mid-stream continues on another worker.

:class:`MigratingClient` sits between ``generate_chunks`` (detokenization, stop strings,
logprobs text, usage) and the client that picks workers (:class:`DisaggregatedClient` or
:class:`WorkerClient`). It remembers every token the request has generated. When the stream
breaks after tokens flowed (:class:`StreamBrokenError`: the connection was lost or timed out,
the worker is shutting down or its stream ended unfinished), it sends the request again, to
another worker, as a new request (id ``<id>:m<n>``) whose prompt is the original prompt plus
every generated token, with ``max_tokens`` and ``min_tokens`` reduced by what was generated.
The lost worker is excluded; the new request may be disaggregated again. The new worker's
deltas are rewritten into the original request's terms, so the text stream above sees one
continuous request: no token twice or missing, usage counted once (prompt tokens of the
original prompt, completion tokens over all attempts, cached tokens of the first attempt).

Failures before the first token are not migrations: the worker client already retries them on
other workers (``max_attempts``). A worker's ``bad_request`` is never migrated (it would be
refused again). A request that cannot migrate (limit 0 or used up, no other worker) ends with
a 502 ``worker_lost`` or ``migration_exhausted`` error (an SSE error event mid-stream).

Sampling caveats: greedy output is the same token for token (the new worker recomputes the
prompt and generated tokens' KV). A sampled request (temperature > 0) continues from a fresh
random state, so a seeded request is not reproducible across a migration; and
``presence_penalty``/``frequency_penalty`` stop counting the tokens generated before the
migration (they are prompt to the new worker; ``repetition_penalty`` covers prompt and output
and is unaffected).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Callable

import msgspec

from tandem.protocols.endpoints import GenerateDelta, GenerateRequest
from tandem.protocols.sampling_params import SamplingParams
from tandem.router.dispatch.prefill_router import DisaggregatedClient
from tandem.router.dispatch.worker_client import SERVING_ROLES, StreamBrokenError, WorkerClient
from tandem.router.errors import NoWorkerError, RequestLostError
from tandem.router.worker_pool import WorkerPool

logger = logging.getLogger(__name__)

_DEFAULT_MAX_TOKENS = SamplingParams().max_tokens  # what a worker uses when the payload names none


def default_migration_limit(num_serving_workers: int) -> int:
    """``--migration-limit`` unset: migrate once when another worker could take the request."""
    return 1 if num_serving_workers > 1 else 0


class _Carry:
    """What a request generated so far, and its deltas rewritten into the original request's terms."""

    def __init__(self, request: GenerateRequest) -> None:
        self.request = request
        self.token_ids: list[int] = []
        """Every token generated so far, over all attempts."""
        self.attempt = 0
        """0 on the first worker, n after the n-th migration."""
        self.carried = 0
        """Tokens generated before the current attempt (its prompt has them)."""
        self.num_prompt_tokens = len(request.token_ids)
        self.num_cached_tokens = 0
        """Prompt tokens the first attempt found cached (usage reports the first attempt's)."""

    def whole(self, delta: GenerateDelta) -> GenerateDelta:
        self.token_ids.extend(delta.token_ids)
        if self.attempt == 0:
            self.num_prompt_tokens = delta.num_prompt_tokens or self.num_prompt_tokens
            self.num_cached_tokens = max(self.num_cached_tokens, delta.num_cached_tokens)
            return delta
        output = delta.num_output_tokens + self.carried if delta.num_output_tokens else 0
        return msgspec.structs.replace(
            delta,
            num_prompt_tokens=self.num_prompt_tokens,
            num_cached_tokens=self.num_cached_tokens,
            num_output_tokens=output,
        )

    def next_request(self) -> GenerateRequest | None:
        """The request that continues from here (None when nothing is left to generate)."""
        done = len(self.token_ids)
        sampling = dict(self.request.sampling)
        max_tokens = sampling.get("max_tokens", _DEFAULT_MAX_TOKENS) - done
        if max_tokens < 1:
            return None
        sampling["max_tokens"] = max_tokens
        if sampling.get("min_tokens"):
            sampling["min_tokens"] = max(0, sampling["min_tokens"] - done)
        self.attempt += 1
        self.carried = done
        return msgspec.structs.replace(
            self.request,
            request_id=f"{self.request.request_id}:m{self.attempt}",
            token_ids=self.request.token_ids + self.token_ids,
            sampling=sampling,
            export_kv=False,
            kv_transfer=None,
        )

    def finished(self) -> GenerateDelta:
        """The last delta of a request whose every token arrived before its stream broke."""
        done = len(self.token_ids)
        return GenerateDelta([], self.num_prompt_tokens, self.num_cached_tokens, done, "length")


class MigratingClient:
    """``generate`` of the wrapped client, with lost mid-stream requests moved to another worker."""

    def __init__(
        self,
        inner: WorkerClient | DisaggregatedClient,
        pool: WorkerPool,
        limit: int | None = None,
        on_outcome: Callable[[str, str], None] | None = None,
        on_limit: Callable[[str, int], None] | None = None,
    ) -> None:
        self.inner, self.pool = inner, pool
        self.limit = limit
        """Migrations per request; None: :func:`default_migration_limit` of the live workers."""
        self.on_outcome = on_outcome
        """Called with (model, outcome) per lost stream: ``migrated``, ``exhausted`` (limit used
        up), ``disabled`` (limit 0) or ``no_worker`` (no other worker took the request)."""
        self.on_limit = on_limit
        """Called with (model, effective limit) when a request starts."""

    def limit_for(self, model: str, exclude: set[str] | frozenset[str] = frozenset()) -> int:
        """The model's effective migration limit now (``exclude``: lost workers, which do not count
        for the default; the lost one itself is counted as the worker the request started on)."""
        if self.limit is not None:
            return self.limit
        others = sum(card.role in SERVING_ROLES and card.worker_id not in exclude for card in self.pool.workers(model))
        return default_migration_limit(others + (1 if exclude else 0))

    async def generate(self, model: str, request: GenerateRequest) -> AsyncGenerator[GenerateDelta, None]:
        """Deltas of the whole request, across migrations. Raises what the wrapped client raises,
        or RequestLostError when a lost stream cannot migrate."""
        limit = self.limit_for(model)  # decided up front: the lost worker leaves the pool when it fails
        if self.on_limit is not None:
            self.on_limit(model, limit)
        carry, attempt, lost_workers = _Carry(request), request, set[str]()
        while True:
            deltas = self.inner.generate(model, attempt, exclude=frozenset(lost_workers))
            try:
                async for delta in deltas:
                    yield carry.whole(delta)
                return
            except StreamBrokenError as exc:
                lost = exc
            except NoWorkerError as exc:
                if carry.attempt == 0:
                    raise
                self._report(model, "no_worker")  # every other worker is gone or failed to answer
                raise RequestLostError(
                    f"{_lost_message(lost, carry)}; migration {carry.attempt} of {limit} found "
                    f"no worker to continue it ({exc.message})"
                ) from None
            finally:
                await deltas.aclose()
            lost_workers.add(lost.worker_id)
            if self.limit is None:
                # The default is judged again at the loss: a worker that was draining or marked
                # down when the request started may be back (a rolling restart).
                limit = max(limit, self.limit_for(model, exclude=lost_workers))
            if carry.attempt >= limit:
                self._report(model, "disabled" if limit == 0 else "exhausted")
                raise _cannot_migrate(lost, carry, limit)
            next_attempt = carry.next_request()
            if next_attempt is None:
                yield carry.finished()
                return
            attempt = next_attempt
            self._report(model, "migrated")
            logger.info(
                "migrating request %s off lost worker %s to another worker as %s (%d tokens carried; "
                "migration %d of %d)",
                request.request_id,
                lost.worker_id,
                attempt.request_id,
                carry.carried,
                carry.attempt,
                limit,
            )

    def _report(self, model: str, outcome: str) -> None:
        if self.on_outcome is not None:
            self.on_outcome(model, outcome)


def _lost_message(lost: StreamBrokenError, carry: _Carry) -> str:
    return f"worker {lost.worker_id} was lost after {len(carry.token_ids)} generated tokens ({lost.reason})"


def _cannot_migrate(lost: StreamBrokenError, carry: _Carry, limit: int) -> RequestLostError:
    if limit == 0:
        return RequestLostError(
            f"{_lost_message(lost, carry)}; request migration is off (--migration-limit 0, "
            "or only one worker served the model)"
        )
    return RequestLostError(
        f"{_lost_message(lost, carry)}; gave up after {carry.attempt} migration(s) (--migration-limit {limit})",
        "migration_exhausted",
    )
