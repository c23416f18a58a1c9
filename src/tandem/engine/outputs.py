"""What the engine hands back after each step, per request."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class RequestOutput:
    """New tokens of one request since its previous output (a streaming delta)."""

    request_id: str
    new_token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None
    """'stop' (EOS or a stop token id), 'length' (max_tokens or context), 'abort', or None."""
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    """Prompt tokens served from the prefix cache."""
    num_output_tokens: int = 0
    """Output tokens so far, including these."""
    logprobs: list[TokenLogprob] | None = None
    stop_token_id: int | None = None
    """The EOS or stop token that ended the request (it is included in new_token_ids)."""
    on_finish_result: Any = None
    """On the final output: what the request's ``on_finish`` hook returned (``AsyncEngine.generate``)."""
    kv_transfer_params: dict[str, Any] | None = None
    """vllm engine, final output: what vLLM's KV connector said about the finished request."""

    def merge(self, later: RequestOutput) -> RequestOutput:
        """This delta followed by ``later`` (of the same request), as one delta."""
        logprobs = None
        if self.logprobs is not None or later.logprobs is not None:
            logprobs = (self.logprobs or []) + (later.logprobs or [])
        return RequestOutput(
            self.request_id,
            self.new_token_ids + later.new_token_ids,
            later.finished,
            later.finish_reason,
            later.num_prompt_tokens,
            later.num_cached_tokens,
            later.num_output_tokens,
            logprobs,
            later.stop_token_id,
            later.on_finish_result,
            later.kv_transfer_params,
        )
