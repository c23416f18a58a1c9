"""Incremental detokenization: turn token ids arriving a few at a time into stable text deltas.

Decoding each new token alone is wrong in two ways: byte-level BPE splits a multi-byte UTF-8
character over several tokens (each decodes to U+FFFD alone), and SentencePiece tokenizers drop
a word's leading space at the start of a decode. Decoding the whole output at every step is
right but costs O(length) per token. ``IncrementalDetokenizer`` decodes a short window instead:
a few already-emitted tokens as context, plus the tokens not emitted yet, and emits only the text
past the context's own decoding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

REPLACEMENT_CHAR = "\ufffd"
PROMPT_CONTEXT_TOKENS = 5
"""Prompt tokens decoded as context before the first output token."""


class IncrementalDetokenizer:
    """Streams the text of a growing token sequence without ever emitting a broken character.

    State is a window of token ids split at ``_read``: ``_window[:_read]`` were already emitted
    and serve as context (``_context_text`` is their decoding), ``_window[_read:]`` are pending.
    Each ``push`` decodes the window and emits the text past ``_context_text``, unless it ends
    in U+FFFD (an incomplete UTF-8 sequence), in which case everything stays pending until a
    later token completes it. After an emission the just-emitted tokens become the new context,
    so the work per token is bounded by the window, not by the length of the output.
    """

    def __init__(
        self, tokenizer: Any, prompt_token_ids: Iterable[int] | None = None, skip_special_tokens: bool = True
    ) -> None:
        """``prompt_token_ids``: tokens before the output (their tail is context, never emitted)."""
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        # The Rust tokenizer's own decode gives the same text as transformers' wrapper when no
        # space clean-up is configured, at a third of the cost (it runs twice per token).
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._raw_decode: Callable[..., str] | None = (
            backend.decode
            if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", True)
            else None
        )
        prompt = list(prompt_token_ids or [])
        self._window: list[int] = prompt[-PROMPT_CONTEXT_TOKENS:] if prompt else []
        self._read = len(self._window)
        self._context_text = self._decode(self._window)
        self.text = ""
        """All text emitted so far."""

    def _decode(self, token_ids: list[int]) -> str:
        if not token_ids:
            return ""
        if self._raw_decode is not None:
            return self._raw_decode(token_ids, skip_special_tokens=self.skip_special_tokens)
        text: str = self.tokenizer.decode(token_ids, skip_special_tokens=self.skip_special_tokens)
        return text

    def push(self, token_ids: Iterable[int]) -> str:
        """Add new token ids; return the text that became stable ("" while it is held back)."""
        self._window.extend(token_ids)
        if self._read == len(self._window):
            return ""
        full_text = self._decode(self._window)
        if len(full_text) <= len(self._context_text) or full_text.endswith(REPLACEMENT_CHAR):
            return ""
        return self._emit(full_text)

    def flush(self) -> str:
        """Return whatever is held back (at the end of a stream), even an incomplete character."""
        if self._read == len(self._window):
            return ""
        full_text = self._decode(self._window)
        if len(full_text) <= len(self._context_text):
            return ""
        return self._emit(full_text)

    def _emit(self, full_text: str) -> str:
        delta = full_text[len(self._context_text) :]
        self._window = self._window[self._read :]
        self._read = len(self._window)
        self._context_text = self._decode(self._window)
        self.text += delta
        return delta
