"""OpenAI response bodies from output chunks: chat and legacy completions, whole or as SSE.

Streams follow OpenAI: chat starts with an assistant-role delta, content deltas follow, the
last choice chunk carries ``finish_reason``, and with ``stream_options.include_usage`` a final
chunk with ``choices: []`` carries the usage (every earlier chunk has ``usage: null``). A
failure after the stream has started is sent as an ``{"error": ...}`` event before ``[DONE]``.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import msgspec

from tandem.frontend.errors import OpenAIError
from tandem.frontend.generation import OutputChunk, TokenLogprobText, UsageCounts
from tandem.frontend.openai_responses import (
    ChatChoiceLogprobs,
    ChatCompletionChoice,
    ChatCompletionResponse,
    ChatResponseMessage,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    Usage,
    now,
    random_id,
)

DONE = b"data: [DONE]\n\n"


def sse(body: bytes) -> bytes:
    return b"data: " + body + b"\n\n"


def _usage(counts: UsageCounts) -> Usage:
    return Usage.make(counts.prompt_tokens, counts.completion_tokens, counts.cached_tokens)


def _chat_logprobs(items: list[TokenLogprobText] | None) -> ChatChoiceLogprobs | None:
    if items is None:
        return None
    return ChatChoiceLogprobs(content=[ChatTokenLogprob.make(lp.token, lp.logprob, lp.top) for lp in items])


# --- chat ---------------------------------------------------------------------------------


async def chat_full(chunks: AsyncIterator[OutputChunk], model: str, want_logprobs: bool) -> ChatCompletionResponse:
    texts: list[str] = []
    logprobs: list[TokenLogprobText] = []
    last = OutputChunk("")
    async for chunk in chunks:
        texts.append(chunk.text)
        logprobs.extend(chunk.logprobs or [])
        last = chunk
    choice = ChatCompletionChoice(
        index=0,
        message=ChatResponseMessage(content="".join(texts)),
        logprobs=_chat_logprobs(logprobs) if want_logprobs else None,
        finish_reason=last.finish_reason or "stop",
    )
    return ChatCompletionResponse(model=model, choices=[choice], usage=_usage(last.usage))


async def chat_stream(
    chunks: AsyncIterator[OutputChunk], model: str, include_usage: bool
) -> AsyncGenerator[bytes, None]:
    head = {"id": random_id("chatcmpl"), "object": "chat.completion.chunk", "created": now(), "model": model}

    def event(choices: list[dict[str, Any]], usage: Usage | None = None) -> bytes:
        # Plain dicts through msgspec: several times cheaper than pydantic per streamed chunk,
        # and the same JSON as ChatCompletionChunk.
        return sse(
            _json(
                {**head, "choices": choices, "usage": usage.model_dump() if usage else None, "system_fingerprint": None}
            )
        )

    yield event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])
    last: OutputChunk | None = None
    try:
        async for chunk in chunks:
            last = chunk
            logprobs = _chat_logprobs(chunk.logprobs)
            yield event(
                [
                    {
                        "index": 0,
                        "delta": {"content": chunk.text} if chunk.text else {},
                        "logprobs": logprobs.model_dump() if logprobs else None,
                        "finish_reason": chunk.finish_reason,
                    }
                ]
            )
    except OpenAIError as exc:
        yield sse(_json(exc.error_body()))
        yield DONE
        return
    if include_usage and last is not None:
        yield event([], _usage(last.usage))
    yield DONE


# --- legacy completions ---------------------------------------------------------------------


def _completion_logprobs(
    items: list[TokenLogprobText] | None, offset: int, into: CompletionLogprobs | None = None
) -> CompletionLogprobs | None:
    if items is None:
        return into
    out = into or CompletionLogprobs()
    for lp in items:
        out.append(lp.token, lp.logprob, lp.top, offset)
        offset += len(lp.token)
    return out


async def completion_full(chunks: AsyncIterator[OutputChunk], model: str) -> CompletionResponse:
    texts: list[str] = []
    logprobs: CompletionLogprobs | None = None
    offset = 0
    last = OutputChunk("")
    async for chunk in chunks:
        logprobs = _completion_logprobs(chunk.logprobs, offset, logprobs)
        texts.append(chunk.text)
        offset += len(chunk.text)
        last = chunk
    choice = CompletionChoice(
        index=0, text="".join(texts), logprobs=logprobs, finish_reason=last.finish_reason or "stop"
    )
    return CompletionResponse(model=model, choices=[choice], usage=_usage(last.usage))


async def completion_stream(
    chunks: AsyncIterator[OutputChunk], model: str, include_usage: bool
) -> AsyncGenerator[bytes, None]:
    head = {"id": random_id("cmpl"), "object": "text_completion", "created": now(), "model": model}
    offset = 0
    last: OutputChunk | None = None
    try:
        async for chunk in chunks:
            last = chunk
            logprobs = _completion_logprobs(chunk.logprobs, offset)
            offset += len(chunk.text)
            choice = {
                "index": 0,
                "text": chunk.text,
                "logprobs": logprobs.model_dump() if logprobs else None,
                "finish_reason": chunk.finish_reason,
            }
            yield sse(_json({**head, "choices": [choice], "usage": None, "system_fingerprint": None}))
    except OpenAIError as exc:
        yield sse(_json(exc.error_body()))
        yield DONE
        return
    if include_usage and last is not None:
        yield sse(_json({**head, "choices": [], "usage": _usage(last.usage).model_dump(), "system_fingerprint": None}))
    yield DONE


_json = msgspec.json.encode
