"""Payloads of the worker's ``generate`` endpoint (plain msgpack data on the request plane).

The frontend sends a ``GenerateRequest``; the worker streams ``GenerateDelta`` items, one per
engine step that produced tokens, the last one with ``finish_reason`` set.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgspec

from tandem.engine.outputs import RequestOutput
from tandem.engine.sampling_params import SamplingParams

_SAMPLING_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams))


def sampling_params_from_payload(sampling: dict[str, Any]) -> SamplingParams:
    """SamplingParams from its wire form (its own field names, all optional, same defaults).

    Raises msgspec.ValidationError (wrong type, or SamplingParams.validate failed) or ValueError
    (a field SamplingParams does not have: a typo must not be silently ignored).
    """
    unknown = set(sampling) - _SAMPLING_FIELDS
    if unknown:
        raise ValueError(f"unknown sampling fields: {sorted(unknown)}")
    return msgspec.convert(sampling, SamplingParams)


class KvTransferParams(msgspec.Struct, forbid_unknown_fields=True):
    """Where a decode worker pulls a finished prefill's KV blocks."""

    address: str
    """``host:port`` of the prefill worker's transfer server."""
    transfer_id: str
    """The held export's id on that server."""
    num_blocks: int
    """Full prompt blocks held (the leading ``num_blocks`` blocks of the prompt)."""
    worker_address: str
    """The prefill worker's request-plane address (its ``kv_release`` endpoint)."""


class GenerateRequest(msgspec.Struct, forbid_unknown_fields=True):
    request_id: str
    token_ids: list[int]
    sampling: dict[str, Any] = msgspec.field(default_factory=dict)
    """SamplingParams fields by name; see sampling_params_from_payload."""
    cache_salt: str | None = None
    export_kv: bool = False
    """Prefill half of a disaggregated request: when it finishes, hold the prompt's KV for a
    decode worker and say where in the last delta's ``kv_transfer``."""
    kv_transfer: KvTransferParams | None = None
    """Decode half: pull the prompt's KV blocks this worker lacks from here before running."""


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
    kv_transfer: KvTransferParams | None = None
    """On the last delta of an ``export_kv`` request: where its KV blocks wait to be pulled."""

    @classmethod
    def from_output(cls, out: RequestOutput) -> "GenerateDelta":
        logprobs = None
        if out.logprobs is not None:
            logprobs = [TokenLogprobPayload(lp.token_id, lp.logprob, list(lp.top_logprobs)) for lp in out.logprobs]
        return cls(out.new_token_ids, out.num_prompt_tokens, out.num_cached_tokens, out.num_output_tokens,
                   out.finish_reason, out.stop_token_id, logprobs)

    def merge(self, later: "GenerateDelta") -> "GenerateDelta":
        """This delta followed by ``later`` (of the same request), as one delta."""
        logprobs = None
        if self.logprobs is not None or later.logprobs is not None:
            logprobs = (self.logprobs or []) + (later.logprobs or [])
        return GenerateDelta(self.token_ids + later.token_ids, later.num_prompt_tokens, later.num_cached_tokens,
                             later.num_output_tokens, later.finish_reason, later.stop_token_id, logprobs,
                             later.kv_transfer or self.kv_transfer)
