"""The request a workload asks the load generator to send."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class BenchRequest:
    """One request to send. Exactly one of ``prompt`` (completions) and ``messages`` (chat) is set."""

    max_tokens: int
    """Output length to ask for (sent with ``ignore_eos`` when the run asks for it)."""
    input_tokens: int
    """Prompt length in tokens as built (token-id prompts: exact)."""
    prompt: list[int] | str | None = None
    """Completions prompt: token ids (exact lengths) or text."""
    messages: list[dict[str, Any]] | None = None
    """Chat messages."""
    timestamp_s: float | None = None
    """Trace replay: when to send it, seconds after the run's start."""
    session_id: str | None = None
    """Multi-turn: the simulated user."""
    turn: int | None = None
    """Multi-turn: 0-based round."""
    hash_ids: list[int] = field(default_factory=list)
    """Trace replay: the block ids the prompt was built from."""
