"""Output text of one choice: incremental detokenization plus stop strings.

Stop strings are matched on text, not tokens, so one can span several tokens and several
chunks. ``TextStream`` holds back the last ``len(longest stop) - 1`` characters of what it has
decoded: a stop string that starts inside them could still complete with the next token. When a
stop string appears, the text before it is released, the stop string itself is dropped (as
OpenAI does), and the stream reports that it stopped, so the caller can cancel the request.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from tandem.frontend.detokenizer import IncrementalDetokenizer


@dataclass
class TextDelta:
    text: str
    """Text that became final with this push (may be empty)."""
    stopped: bool = False
    """True when a stop string was found: nothing more will be emitted."""


class TextStream:
    """Turns a request's output token ids into final text chunks, honouring stop strings."""

    def __init__(self, tokenizer: Any, prompt_token_ids: Sequence[int] | None = None, stop: Iterable[str] = ()) -> None:
        self._detok = IncrementalDetokenizer(tokenizer, prompt_token_ids)
        self.stop = [s for s in stop if s]
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self._text = ""  # decoded so far (including held-back characters)
        self._emitted = 0  # characters of _text already released
        self.stopped = False
        self.stop_string: str | None = None
        """The stop string that ended the text, if one did."""

    @property
    def text(self) -> str:
        """All text released so far."""
        return self._text[: self._emitted]

    def push(self, token_ids: Iterable[int]) -> TextDelta:
        """Add new output tokens; return the text that is final now."""
        if self.stopped:
            return TextDelta("", True)
        self._text += self._detok.push(token_ids)
        return self._release(final=False)

    def finish(self) -> TextDelta:
        """The stream ended: release everything still held back (stop strings still apply)."""
        if self.stopped:
            return TextDelta("", True)
        self._text += self._detok.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> TextDelta:
        if self.stop:
            # A match that ends in new text starts at or after _emitted: everything before
            # _emitted was released only once no stop string could still start there.
            hit = self._find_stop(self._emitted)
            if hit is not None:
                start, stop = hit
                delta = self._text[self._emitted : start]
                self._emitted = start
                self.stopped, self.stop_string = True, stop
                return TextDelta(delta, True)
        end = len(self._text) if final else max(self._emitted, len(self._text) - self._hold)
        delta = self._text[self._emitted : end]
        self._emitted = end
        return TextDelta(delta)

    def _find_stop(self, start: int) -> tuple[int, str] | None:
        """The earliest stop string at or after ``start`` (ties: the longer one)."""
        best: tuple[int, str] | None = None
        for s in self.stop:
            pos = self._text.find(s, start)
            if pos >= 0 and (best is None or pos < best[0] or (pos == best[0] and len(s) > len(best[1]))):
                best = (pos, s)
        return best
