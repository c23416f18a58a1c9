"""Map a validated OpenAI request onto the engine's :class:`SamplingParams`.

Stop *strings* stay with the frontend (its detokenizer holds text back across chunks), so they
are returned separately by :func:`stop_strings`; ``stop_token_ids`` go to the engine.
"""

from __future__ import annotations

import re

from tandem.frontend.errors import OpenAIError, bad_request, context_too_long
from tandem.frontend.openai_requests import ChatCompletionRequest, CompletionRequest
from tandem.protocols.sampling_params import SamplingParams

AnyRequest = ChatCompletionRequest | CompletionRequest

_SP_FIELD = re.compile(r"^([a-z_]+) ")


def _max_tokens_param(request: AnyRequest) -> tuple[int | None, str]:
    """The requested completion length and the field it came from.

    ``max_completion_tokens`` (chat only) wins over the deprecated ``max_tokens``.
    """
    if isinstance(request, ChatCompletionRequest) and request.max_completion_tokens is not None:
        return request.max_completion_tokens, "max_completion_tokens"
    return request.max_tokens, "max_tokens"


def _logprobs(request: AnyRequest) -> int | None:
    """Chat: ``logprobs: bool`` + ``top_logprobs: int``; completions: ``logprobs: int``."""
    if isinstance(request, ChatCompletionRequest):
        if not request.logprobs:
            return None
        return request.top_logprobs or 0
    return request.logprobs


def stop_strings(request: AnyRequest) -> list[str]:
    """Stop sequences the frontend must watch for in the detokenized text."""
    return list(request.stop)


def to_sampling_params(
    request: AnyRequest,
    *,
    default_max_tokens: int | None = None,
    context_length: int,
    prompt_len: int,
) -> SamplingParams:
    """Build engine parameters; raise :class:`OpenAIError` (400) for anything the engine
    cannot honour.

    * ``max_completion_tokens`` wins over ``max_tokens``; when neither is given the default is
      ``context_length - prompt_len``, capped by ``default_max_tokens`` when that is set.
    * ``prompt_len + max_tokens > context_length`` → 400 ``context_length_exceeded``.
    * ``n > 1`` → 400 (one choice per request for now).
    """
    prompt_param = "messages" if isinstance(request, ChatCompletionRequest) else "prompt"
    if request.n is not None and request.n > 1:
        raise bad_request("n>1 is not supported: request one choice (n=1) at a time", "n", "unsupported_parameter")
    if prompt_len >= context_length:
        raise context_too_long(context_length, prompt_len, None, prompt_param)
    room = context_length - prompt_len
    requested, mt_param = _max_tokens_param(request)
    if requested is None:
        max_tokens = room if default_max_tokens is None else max(1, min(room, default_max_tokens))
    else:
        if prompt_len + requested > context_length:
            raise context_too_long(context_length, prompt_len, requested, mt_param)
        max_tokens = requested
    min_tokens = request.min_tokens or 0
    if min_tokens > max_tokens:
        raise bad_request(
            f"min_tokens ({min_tokens}) must not exceed the maximum completion length ({max_tokens})",
            "min_tokens",
        )
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            min_tokens=min_tokens,
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            top_k=0 if request.top_k is None else request.top_k,
            min_p=0.0 if request.min_p is None else request.min_p,
            seed=request.seed,
            presence_penalty=request.presence_penalty or 0.0,
            frequency_penalty=request.frequency_penalty or 0.0,
            repetition_penalty=(1.0 if request.repetition_penalty is None else request.repetition_penalty),
            stop_token_ids=list(request.stop_token_ids or []),
            ignore_eos=bool(request.ignore_eos),
            logprobs=_logprobs(request),
        )
    except ValueError as e:
        msg = str(e)
        m = _SP_FIELD.match(msg)
        param = m.group(1) if m else None
        if param == "logprobs" and isinstance(request, ChatCompletionRequest):
            param = "top_logprobs"
        if param == "max_tokens":
            param = mt_param
        raise OpenAIError(400, msg, "invalid_request_error", param) from None
