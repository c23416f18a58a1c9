"""OpenAI response bodies from output chunks: chat and legacy completions, whole or as SSE.

Streams follow OpenAI: chat starts with an assistant-role delta, content deltas follow, the
last choice chunk carries ``finish_reason``, and with ``stream_options.include_usage`` a final
chunk with ``choices: []`` carries the usage (every earlier chunk has ``usage: null``). A
failure after the stream has started is sent as an ``{"error": ...}`` event before ``[DONE]``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from tandem.frontend.errors import OpenAIError
from tandem.frontend.generation import OutputChunk, TokenLogprobText, UsageCounts
from tandem.frontend.protocol_responses import (
    ChatChoiceLogprobs,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionResponse,
    ChatResponseMessage,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionResponse,
    DeltaMessage,
    Usage,
    now,
    random_id,
)

DONE = b"data: [DONE]\n\n"


def sse(json_text: str | bytes) -> bytes:
    body = json_text.encode() if isinstance(json_text, str) else json_text
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
        index=0, message=ChatResponseMessage(content="".join(texts)),
        logprobs=_chat_logprobs(logprobs) if want_logprobs else None,
        finish_reason=last.finish_reason or "stop")
    return ChatCompletionResponse(model=model, choices=[choice], usage=_usage(last.usage))


async def chat_stream(chunks: AsyncIterator[OutputChunk], model: str, include_usage: bool) -> AsyncIterator[bytes]:
    chunk_id, created = random_id("chatcmpl"), now()

    def event(choices: list[ChatCompletionChunkChoice], usage: Usage | None = None) -> bytes:
        return sse(ChatCompletionChunk(id=chunk_id, created=created, model=model, choices=choices,
                                       usage=usage).model_dump_json())

    yield event([ChatCompletionChunkChoice(index=0, delta=DeltaMessage(role="assistant", content=""))])
    last: OutputChunk | None = None
    try:
        async for chunk in chunks:
            last = chunk
            delta = DeltaMessage(content=chunk.text) if chunk.text else DeltaMessage()
            yield event([ChatCompletionChunkChoice(index=0, delta=delta, logprobs=_chat_logprobs(chunk.logprobs),
                                                   finish_reason=chunk.finish_reason)])
    except OpenAIError as exc:
        yield sse(_error_json(exc))
        yield DONE
        return
    if include_usage and last is not None:
        yield event([], _usage(last.usage))
    yield DONE


# --- legacy completions ---------------------------------------------------------------------


def _completion_logprobs(items: list[TokenLogprobText] | None, offset: int,
                         into: CompletionLogprobs | None = None) -> CompletionLogprobs | None:
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
    choice = CompletionChoice(index=0, text="".join(texts), logprobs=logprobs, finish_reason=last.finish_reason or "stop")
    return CompletionResponse(model=model, choices=[choice], usage=_usage(last.usage))


async def completion_stream(chunks: AsyncIterator[OutputChunk], model: str, include_usage: bool) -> AsyncIterator[bytes]:
    chunk_id, created = random_id("cmpl"), now()
    offset = 0
    last: OutputChunk | None = None
    try:
        async for chunk in chunks:
            last = chunk
            choice = CompletionChoice(index=0, text=chunk.text, logprobs=_completion_logprobs(chunk.logprobs, offset),
                                      finish_reason=chunk.finish_reason)
            offset += len(chunk.text)
            yield sse(CompletionChunk(id=chunk_id, created=created, model=model, choices=[choice]).model_dump_json())
    except OpenAIError as exc:
        yield sse(_error_json(exc))
        yield DONE
        return
    if include_usage and last is not None:
        yield sse(CompletionChunk(id=chunk_id, created=created, model=model, choices=[],
                                  usage=_usage(last.usage)).model_dump_json())
    yield DONE


def _error_json(exc: OpenAIError) -> bytes:
    return json.dumps(exc.error_body()).encode()
