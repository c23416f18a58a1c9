"""The prefill router: prefill on a prefill worker, decode on a decode worker, when it pays.

When the model has live ``prefill`` workers and the prompt is longer than
``max_local_prefill_length``, a request runs in two halves (Dynamo's
dispatcher-orchestrated flow, run in the frontend process):

1. **Prefill**: the prompt goes to a prefill worker (picked by the routing policy, so the kv
   router finds prefix hits) with ``max_tokens=1`` and ``export_kv``. Its one token is the first
   token the client sees; its last delta says where the prompt's KV blocks wait.
2. **Decode**: prompt + that token go to a decode (or agg) worker, which pulls only the blocks it
   lacks, imports them and generates the rest (``max_tokens - 1``).

Conditional disaggregation: a short prompt (at most ``max_local_prefill_length`` tokens) or busy
prefill workers (this frontend already has ``max_prefill_queue_size`` prefill halves in flight per
live prefill worker) → the whole request runs on a decode/agg worker, which prefills itself.
Fallbacks, so disaggregation never fails a request: no live prefill worker, or a prefill worker
that is lost or errs → the same. A failed KV pull is handled on the decode worker (local prefill).

Held blocks are never left to expire: once the request is over (finished, failed, the client left,
the first token ended it), the dispatcher sends ``kv_release`` to the prefill worker, in the
background. After a successful pull the export is already gone and the release is a no-op; it
matters when the decode worker did not pull (a failed pull, or it held the whole prompt already)
or the request ended before the decode half.

Sampling notes: the decode half sees the first token as prompt, so ``min_tokens`` and
``max_tokens`` are shifted by one; ``presence_penalty``/``frequency_penalty`` do not count that
one token, and a seeded sample (temperature > 0) differs from the aggregated one. Greedy output
is the same token for token.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass

import msgspec

from tandem.protocols.endpoints import Endpoint, GenerateDelta, GenerateRequest, KvReleaseRequest, KvTransferParams
from tandem.protocols.sampling_params import SamplingParams
from tandem.router.dispatch.worker_client import StreamBrokenError, WorkerClient
from tandem.router.errors import RouterError, WorkerRejectedError
from tandem.runtime.background import spawn

logger = logging.getLogger(__name__)

PREFILL_ROLES = ("prefill",)
_DEFAULT_MAX_TOKENS = SamplingParams().max_tokens  # what a worker uses when the payload names none


@dataclass
class DisaggConfig:
    max_local_prefill_length: int = 64
    """Prompts of at most this many tokens are prefilled on the decode worker (a transfer would
    cost more than it saves)."""
    max_prefill_queue_size: int = 8
    """Prefill on the decode worker instead when this frontend already has this many prefill
    halves in flight per live prefill worker (every prefill worker is busy: queueing there would
    cost more TTFT than a local prefill); 0 = never."""
    release_timeout_s: float = 2.0
    """How long a ``kv_release`` to a prefill worker may take (best effort)."""


def local_prefill_reason(
    num_prompt_tokens: int, num_prefill_workers: int, prefills_in_flight: int, config: DisaggConfig
) -> str | None:
    """Conditional disaggregation: why a request runs whole on a decode worker
    ("no_prefill_workers", "local_short", "local_busy"), or None to run it in two halves."""
    if num_prefill_workers == 0:
        return "no_prefill_workers"
    if num_prompt_tokens <= config.max_local_prefill_length:
        return "local_short"
    limit = config.max_prefill_queue_size
    if limit and prefills_in_flight >= limit * num_prefill_workers:
        return "local_busy"
    return None


class DisaggregatedClient:
    """`WorkerClient.generate` with the two-halves flow when prefill workers exist."""

    def __init__(
        self,
        workers: WorkerClient,
        config: DisaggConfig | None = None,
        on_outcome: Callable[[str, str], None] | None = None,
    ) -> None:
        self.workers = workers
        self.config = config or DisaggConfig()
        self.on_outcome = on_outcome
        """Called per request that had prefill workers with (model, outcome): "disaggregated",
        "fallback" (prefill failed), "local_short" (short prompt) or "local_busy" (queue full)."""
        self.prefills_in_flight: dict[str, int] = {}
        """Prefill halves running now, per model."""
        self.disaggregated_total = 0
        """Requests served in two halves."""
        self.fallbacks_total = 0
        """Requests that had prefill workers but ran whole on a decode worker after a prefill failure."""

    async def generate(
        self, model: str, request: GenerateRequest, exclude: frozenset[str] = frozenset()
    ) -> AsyncGenerator[GenerateDelta, None]:
        """Deltas of the whole request; ``exclude``: workers not to use (lost ones, on migration)."""
        local = self._run_locally(model, request)
        if local is not None:
            if local != "no_prefill_workers":
                self._report(model, local)
            async for delta in self.workers.generate(model, request, exclude=exclude):
                yield delta
            return
        first = await self._prefill(model, request, exclude)
        if first is None:
            self.fallbacks_total += 1
            self._report(model, "fallback")
            async for delta in self.workers.generate(model, request, exclude=exclude):
                yield delta
            return
        self.disaggregated_total += 1
        self._report(model, "disaggregated")
        params = first.kv_transfer
        first.kv_transfer = None
        try:
            if first.finish_reason == "stop" or request.sampling.get("max_tokens", _DEFAULT_MAX_TOKENS) <= 1:
                yield first  # the first token ended the request: there is nothing to decode
                return
            yield msgspec.structs.replace(first, finish_reason=None, stop_token_id=None)
            async for delta in self.workers.generate(model, _decode_request(request, first, params), exclude=exclude):
                yield _as_whole_request(delta, first)
        finally:
            if params is not None:  # a no-op when the decode worker pulled it (see the module docstring)
                spawn(self._release(params))

    def _run_locally(self, model: str, request: GenerateRequest) -> str | None:
        """Why the request should run whole on a decode worker, or None to disaggregate it."""
        prefill_workers = sum(card.role == "prefill" for card in self.workers.pool.workers(model))
        return local_prefill_reason(
            len(request.token_ids), prefill_workers, self.prefills_in_flight.get(model, 0), self.config
        )

    def _report(self, model: str, outcome: str) -> None:
        if self.on_outcome is not None:
            self.on_outcome(model, outcome)

    async def _prefill(
        self, model: str, request: GenerateRequest, exclude: frozenset[str] = frozenset()
    ) -> GenerateDelta | None:
        """The prefill half's merged deltas; None when it could not run (the caller falls back)."""
        sampling = {**request.sampling, "max_tokens": 1, "min_tokens": min(1, request.sampling.get("min_tokens", 0))}
        half = msgspec.structs.replace(
            request, request_id=f"{request.request_id}:prefill", sampling=sampling, export_kv=True
        )
        merged: GenerateDelta | None = None
        deltas = self.workers.generate(model, half, PREFILL_ROLES, exclude)
        self.prefills_in_flight[model] = self.prefills_in_flight.get(model, 0) + 1
        try:
            try:
                async for delta in deltas:
                    merged = delta if merged is None else merged.merge(delta)
            finally:
                self.prefills_in_flight[model] -= 1
                await deltas.aclose()
        except StreamBrokenError as exc:
            logger.warning("prefill of %s lost (%s); decoding it whole", request.request_id, exc)
            return None
        except WorkerRejectedError:
            raise  # the request itself is bad: a decode worker would refuse it too
        except RouterError as exc:
            logger.warning("prefill of %s failed (%s); decoding it whole", request.request_id, exc.message)
            return None
        except BaseException:  # cancelled (the client left): free blocks the prefill already exported
            if merged is not None and merged.kv_transfer is not None:
                spawn(self._release(merged.kv_transfer))
            raise
        return merged if merged is not None and merged.finish_reason is not None else None

    async def _release(self, params: KvTransferParams) -> None:
        """Free the held blocks on the prefill worker (best effort; they expire anyway)."""
        try:
            await self.workers.client.call(
                params.worker_address,
                Endpoint.KV_RELEASE,
                msgspec.to_builtins(KvReleaseRequest(params.transfer_id)),
                timeout=self.config.release_timeout_s,
            )
        except Exception as exc:  # best effort: the export expires on its own
            logger.debug("kv_release of %s failed: %s", params.transfer_id, exc)


def _decode_request(request: GenerateRequest, first: GenerateDelta, params: KvTransferParams | None) -> GenerateRequest:
    """The decode half: prompt + the prefill's token, one token fewer to generate, and where the KV is."""
    sampling = dict(request.sampling)
    sampling["max_tokens"] = sampling.get("max_tokens", _DEFAULT_MAX_TOKENS) - 1
    if sampling.get("min_tokens"):
        sampling["min_tokens"] -= 1
    return msgspec.structs.replace(
        request, token_ids=request.token_ids + first.token_ids, sampling=sampling, kv_transfer=params
    )


def _as_whole_request(delta: GenerateDelta, first: GenerateDelta) -> GenerateDelta:
    """A decode-half delta in the whole request's terms: the prefill's token is output, not
    prompt, and cached tokens are what the prefill worker found (imported blocks are not hits)."""
    return msgspec.structs.replace(
        delta,
        num_prompt_tokens=first.num_prompt_tokens,
        num_cached_tokens=first.num_cached_tokens,
        num_output_tokens=delta.num_output_tokens + len(first.token_ids) if delta.num_output_tokens else 0,
    )
