"""Requests to token ids: tokenizers per model, chat templates, tokenization off the event loop.

The frontend learns a model's tokenizer source from its workers' cards and loads it once (a
model-cache name, an HF directory or a GGUF file; loading runs in a thread). Rendering a chat
template and tokenizing a long prompt can take milliseconds, so both run on a small thread pool:
other streams keep flowing while one request's 100k-character prompt is being tokenized.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol, TypeVar, TypeVarTuple

from tandem.frontend.errors import OpenAIError, bad_request
from tandem.frontend.openai_requests import ChatCompletionRequest, CompletionRequest
from tandem.runtime.background import spawn

logger = logging.getLogger(__name__)

INLINE_TOKENIZE_CHARS = 2048
"""Prompts shorter than this are tokenized on the event loop (a thread hop costs more)."""

_T = TypeVar("_T")
_Ts = TypeVarTuple("_Ts")


class PromptTokenizer(Protocol):
    """What the frontend calls on a model's tokenizer (a transformers tokenizer: HF or GGUF).

    ``chat_template`` is read with ``getattr``: a tokenizer may have none."""

    def __len__(self) -> int: ...

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str: ...

    def apply_chat_template(
        self,
        conversation: list[dict[str, str]],
        *,
        tokenize: bool,
        add_generation_prompt: bool,
        continue_final_message: bool,
    ) -> str: ...


@dataclass
class PreparedPrompt:
    token_ids: list[int]
    text: str | None
    """The rendered prompt text (None when the client sent token ids)."""


class TokenizerError(OpenAIError):
    def __init__(self, message: str) -> None:
        super().__init__(500, message, "server_error", None, "tokenizer_unavailable")


class Tokenizers:
    """Loads each tokenizer source once and keeps it; safe to call from many requests at once."""

    def __init__(self, executor: ThreadPoolExecutor | None = None) -> None:
        self.executor = executor or ThreadPoolExecutor(max_workers=2, thread_name_prefix="tandem-tokenize")
        self._loaded: dict[str, PromptTokenizer | None] = {}
        self._loading: dict[str, asyncio.Future[PromptTokenizer | None]] = {}

    async def get(self, source: str) -> PromptTokenizer | None:
        """The tokenizer of ``source`` (None when the model ships none: token-id prompts only)."""
        if source in self._loaded:
            return self._loaded[source]
        pending = self._loading.get(source)
        if pending is None:
            pending = asyncio.get_running_loop().run_in_executor(self.executor, _load, source)
            self._loading[source] = pending
        try:
            tokenizer = await asyncio.shield(pending)
        except Exception as exc:
            self._loading.pop(source, None)
            logger.exception("cannot load tokenizer %s", source)
            raise TokenizerError(f"cannot load the tokenizer of this model ({source}): {exc}") from None
        self._loaded[source] = tokenizer
        self._loading.pop(source, None)
        return tokenizer

    def preload(self, source: str) -> None:
        """Start loading ``source`` in the background (a new model's first request then finds it ready)."""
        if source in self._loaded or source in self._loading:
            return

        async def load() -> None:
            try:
                await self.get(source)
            except TokenizerError:
                pass  # logged by get(); requests for this model will report it

        spawn(load())

    async def run(self, fn: Callable[[*_Ts], _T], *args: *_Ts) -> _T:
        """Run a tokenizer call on the pool."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def _load(source: str) -> PromptTokenizer | None:
    from tandem.models.tokenizer import load_tokenizer

    tokenizer: PromptTokenizer | None = load_tokenizer(source)  # a transformers tokenizer, or None
    return tokenizer


def render_chat(tokenizer: PromptTokenizer, request: ChatCompletionRequest) -> str:
    """The prompt text of a chat request, from the tokenizer's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise bad_request("this model has no chat template: use /v1/completions", "messages", "chat_template_missing")
    messages = [m.as_template_message() for m in request.messages]
    add_generation_prompt = messages[-1]["role"] != "assistant"
    try:
        return tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )
    except Exception as exc:  # template errors (e.g. "roles must alternate") are the client's to fix
        raise bad_request(f"the chat template rejected these messages: {exc}", "messages") from None


def _encode(tokenizer: PromptTokenizer, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))


def _render_and_encode(tokenizer: PromptTokenizer, request: ChatCompletionRequest) -> PreparedPrompt:
    text = render_chat(tokenizer, request)
    # The template already wrote the special tokens (BOS and the like).
    return PreparedPrompt(_encode(tokenizer, text, False), text)


async def prepare_prompt(
    tokenizers: Tokenizers, tokenizer: PromptTokenizer | None, request: ChatCompletionRequest | CompletionRequest
) -> PreparedPrompt:
    """Token ids for a request (chat: template + tokenize; completion: tokenize or as given)."""
    if isinstance(request, ChatCompletionRequest):
        if tokenizer is None:
            raise _no_tokenizer("messages")
        size = sum(len(m.text) for m in request.messages)
        if size < INLINE_TOKENIZE_CHARS:
            return _render_and_encode(tokenizer, request)
        return await tokenizers.run(_render_and_encode, tokenizer, request)
    text = request.prompt
    if isinstance(text, list):
        vocab_size = len(tokenizer) if tokenizer is not None else None
        if vocab_size is not None and max(text) >= vocab_size:
            raise bad_request(f"token ids must be below the vocabulary size {vocab_size}", "prompt")
        return PreparedPrompt(list(text), None)
    if tokenizer is None:
        raise _no_tokenizer("prompt")
    # Raw completion prompts get the tokenizer's own special tokens (BOS), as in vLLM.
    if len(text) < INLINE_TOKENIZE_CHARS:
        return PreparedPrompt(_encode(tokenizer, text, True), text)
    return PreparedPrompt(await tokenizers.run(_encode, tokenizer, text, True), text)


def _no_tokenizer(param: str) -> OpenAIError:
    return bad_request("this model has no tokenizer: send the prompt as token ids to /v1/completions", param)
