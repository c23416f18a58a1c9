"""Payloads of the worker's ``generate`` endpoint (plain msgpack data on the request plane).

The frontend sends a ``GenerateRequest``; the worker streams ``GenerateDelta`` items, one per
engine step that produced tokens, the last one with ``finish_reason`` set.
"""

from __future__ import annotations

import msgspec

from tandem.engine.outputs import RequestOutput
from tandem.engine.sampling_params import SamplingParams


class SamplingPayload(msgspec.Struct, forbid_unknown_fields=True):
    """SamplingParams as it travels: the same fields, all optional, same defaults."""

    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop_token_ids: list[int] = msgspec.field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None

    def to_params(self) -> SamplingParams:
        """Validated SamplingParams; raises ValueError naming the bad field."""
        return SamplingParams(**msgspec.structs.asdict(self))


class GenerateRequest(msgspec.Struct, forbid_unknown_fields=True):
    request_id: str
    token_ids: list[int]
    sampling: SamplingPayload = msgspec.field(default_factory=SamplingPayload)
    cache_salt: str | None = None


class TokenLogprobPayload(msgspec.Struct):
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = msgspec.field(default_factory=list)


class GenerateDelta(msgspec.Struct, omit_defaults=True):
    token_ids: list[int]
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0
    finish_reason: str | None = None
    stop_token_id: int | None = None
    logprobs: list[TokenLogprobPayload] | None = None

    @classmethod
    def from_output(cls, out: RequestOutput) -> "GenerateDelta":
        logprobs = None
        if out.logprobs is not None:
            logprobs = [TokenLogprobPayload(lp.token_id, lp.logprob, list(lp.top_logprobs)) for lp in out.logprobs]
        return cls(out.new_token_ids, out.num_prompt_tokens, out.num_cached_tokens, out.num_output_tokens,
                   out.finish_reason, out.stop_token_id, logprobs)
