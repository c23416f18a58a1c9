"""One request's generation as the frontend sees it: worker deltas in, final text chunks out.

``generate_chunks`` sends the request to a worker and turns its token deltas into
:class:`OutputChunk` items: text that is final (stop strings held back and trimmed), the
chunk's logprobs, and on the last one the finish reason and usage. Leaving the iterator early
(a client disconnect, a stop string) cancels the request on the worker. Timing metrics (TTFT,
inter-token latency, duration) are recorded here, once for every endpoint. A request migrated
to another worker (:mod:`tandem.router.dispatch.migration`) arrives here as one continuous stream of
deltas, so text, stop strings, logprobs and usage carry across the switch.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any, Literal

from tandem.frontend.errors import OpenAIError, from_router_error
from tandem.frontend.metrics import FrontendMetrics
from tandem.frontend.preprocess import PromptTokenizer
from tandem.frontend.text_stream import TextStream
from tandem.protocols.endpoints import GenerateDelta, GenerateRequest, TokenLogprobPayload
from tandem.protocols.sampling_params import SamplingParams
from tandem.router.dispatch.migration import MigratingClient
from tandem.router.dispatch.prefill_router import DisaggregatedClient
from tandem.router.dispatch.worker_client import StreamBrokenError, WorkerClient
from tandem.router.errors import RouterError


@dataclass
class TokenLogprobText:
    token: str
    logprob: float
    top: list[tuple[str, float]]


@dataclass
class UsageCounts:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


ChunkFinish = Literal["stop", "length"]
"""Why a choice ended, as the frontend reports it (a worker's other reasons are errors)."""


@dataclass
class OutputChunk:
    text: str
    logprobs: list[TokenLogprobText] | None = None
    finish_reason: ChunkFinish | None = None
    """``stop`` or ``length`` on the last chunk, else None."""
    usage: UsageCounts = field(default_factory=UsageCounts)


@dataclass
class GenerationSpec:
    """Everything a generation needs once the request is validated and tokenized."""

    model: str
    prompt_token_ids: list[int]
    params: SamplingParams
    stop: list[str]
    tokenizer: PromptTokenizer | None
    cache_salt: str | None = None
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    arrival: float = field(default_factory=time.perf_counter)


def _token_text(tokenizer: PromptTokenizer | None, token_id: int) -> str:
    if tokenizer is None:
        return f"<{token_id}>"
    return tokenizer.decode([token_id], skip_special_tokens=False)


def _logprobs_text(tokenizer: PromptTokenizer | None, items: list[TokenLogprobPayload]) -> list[TokenLogprobText]:
    return [
        TokenLogprobText(
            _token_text(tokenizer, lp.token_id), lp.logprob, [(_token_text(tokenizer, t), v) for t, v in lp.top]
        )
        for lp in items
    ]


def _sampling_payload(params: SamplingParams) -> dict[str, Any]:
    """Only the fields that differ from SamplingParams' defaults (smaller frames)."""
    default = _DEFAULT_PARAMS
    return {name: value for name, value in vars(params).items() if value != getattr(default, name)}


_DEFAULT_PARAMS = SamplingParams()


class _Timer:
    """TTFT, inter-token latency and duration of one request, into the frontend metrics."""

    def __init__(self, metrics: FrontendMetrics, model: str, arrival: float) -> None:
        self.metrics, self.model = metrics, model
        self.arrival = self.last = arrival
        self.first = True

    def tokens(self, count: int) -> None:
        if count <= 0:
            return
        now = time.perf_counter()
        if self.first:
            self.metrics.ttft.labels(self.model).observe(now - self.arrival)
            self.first = False
            count -= 1
        if count > 0:
            gap = (now - self.last) / count
            histogram = self.metrics.itl.labels(self.model)
            for _ in range(count):
                histogram.observe(gap)
        self.last = now

    def done(self, usage: UsageCounts) -> None:
        m = self.metrics
        m.duration.labels(self.model).observe(time.perf_counter() - self.arrival)
        m.input_tokens.labels(self.model).observe(usage.prompt_tokens)
        m.output_tokens.labels(self.model).observe(usage.completion_tokens)
        if usage.cached_tokens:
            m.cached_tokens.labels(self.model).inc(usage.cached_tokens)


async def generate_chunks(
    spec: GenerationSpec, workers: MigratingClient | DisaggregatedClient | WorkerClient, metrics: FrontendMetrics
) -> AsyncGenerator[OutputChunk, None]:
    """Final text chunks of one choice; the last one has ``finish_reason`` and full usage."""
    text = TextStream(spec.tokenizer, spec.prompt_token_ids, spec.stop) if spec.tokenizer is not None else None
    timer = _Timer(metrics, spec.model, spec.arrival)
    usage = UsageCounts(prompt_tokens=len(spec.prompt_token_ids))
    request = GenerateRequest(spec.request_id, spec.prompt_token_ids, _sampling_payload(spec.params), spec.cache_salt)
    deltas = workers.generate(spec.model, request)
    try:
        async for delta in deltas:
            timer.tokens(len(delta.token_ids))
            chunk = _to_chunk(delta, text, spec.tokenizer, usage)
            if chunk.finish_reason is not None:
                timer.done(usage)
                yield chunk
                return
            if chunk.text or chunk.logprobs:
                yield chunk
    except StreamBrokenError as exc:  # ``workers`` does not migrate
        raise OpenAIError(502, str(exc), "server_error", None, "worker_lost") from None
    except RouterError as exc:
        raise from_router_error(exc) from None
    finally:
        await deltas.aclose()
    raise OpenAIError(
        502,
        "the worker ended the stream without finishing the request",
        "server_error",
        None,
        "worker_stream_incomplete",
    )


def _to_chunk(
    delta: GenerateDelta, text: TextStream | None, tokenizer: PromptTokenizer | None, usage: UsageCounts
) -> OutputChunk:
    usage.prompt_tokens = delta.num_prompt_tokens or usage.prompt_tokens
    usage.cached_tokens = max(usage.cached_tokens, delta.num_cached_tokens)
    usage.completion_tokens = delta.num_output_tokens or usage.completion_tokens + len(delta.token_ids)
    logprobs = _logprobs_text(tokenizer, delta.logprobs) if delta.logprobs else None
    if text is None:
        finish = _finish_reason(delta.finish_reason)
        return OutputChunk("", logprobs, finish, usage)
    piece = text.push(delta.token_ids)
    if piece.stopped:
        return OutputChunk(piece.text, logprobs, "stop", usage)
    if delta.finish_reason is None:
        return OutputChunk(piece.text, logprobs, None, usage)
    tail = text.finish()
    finish = "stop" if tail.stopped else _finish_reason(delta.finish_reason)
    return OutputChunk(piece.text + tail.text, logprobs, finish, usage)


def _finish_reason(reason: str | None) -> ChunkFinish | None:
    if reason is None:
        return None
    if reason == "stop":
        return "stop"
    if reason == "length":
        return "length"
    raise OpenAIError(502, f"the worker ended the request with {reason!r}", "server_error", None, "worker_aborted")
