"""The worker's request-plane endpoints: their names and a typed payload for each.

Payloads travel as plain msgpack data (``msgspec.to_builtins`` of these structs) and are read
back with ``msgspec.convert``:

* ``generate``: a ``GenerateRequest`` in; a stream of ``GenerateDelta`` out, one per engine step
  that produced tokens, the last one with ``finish_reason`` set;
* ``health``: no payload; a ``HealthReply``;
* ``stats``: no payload; a ``StatsReply`` (the frontend's load view, polled);
* ``kv_dump``: no payload; a ``KvDumpReply``, every cached block as ``BlockStored`` events;
* ``kv_release``: a ``KvReleaseRequest``; a ``KvReleaseReply`` (a held prefill export dropped).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgspec

from tandem.protocols.kv_events import BlockStored
from tandem.protocols.sampling_params import SamplingParams


class Endpoint:
    """Endpoint names on a worker's request plane."""

    GENERATE = "generate"
    HEALTH = "health"
    STATS = "stats"
    KV_DUMP = "kv_dump"
    KV_RELEASE = "kv_release"


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

    def merge(self, later: GenerateDelta) -> GenerateDelta:
        """This delta followed by ``later`` (of the same request), as one delta."""
        logprobs = None
        if self.logprobs is not None or later.logprobs is not None:
            logprobs = (self.logprobs or []) + (later.logprobs or [])
        return GenerateDelta(
            self.token_ids + later.token_ids,
            later.num_prompt_tokens,
            later.num_cached_tokens,
            later.num_output_tokens,
            later.finish_reason,
            later.stop_token_id,
            logprobs,
            later.kv_transfer or self.kv_transfer,
        )


class HealthReply(msgspec.Struct):
    status: str
    """``ok``, ``draining`` (shutting down) or ``failed`` (the engine died)."""
    worker_id: str
    model: str
    role: str
    engine_alive: bool
    num_running: int
    num_waiting: int
    uptime_s: float
    kv_tiers: KvTierStats | None = None
    """Usage and counters of the KV tiers below the engine's pool; None without tiers."""


class KvTierStats(msgspec.Struct):
    """An engine's KV tiers below its pool: usage now and counters since start (G1 is the
    engine's pool, G2 host memory, G3 disk)."""

    host_blocks: int = 0
    host_capacity_blocks: int = 0
    host_shared: str | None = None
    """Name of the node-wide host tier, None when private (or absent)."""
    disk_blocks: int = 0
    disk_capacity_blocks: int = 0
    disk_writes_paused: bool = False
    disk_unavailable: str | None = None
    """Why the configured disk tier is off (e.g. its directory cannot be created); None when fine."""
    offloaded_g1_g2: int = 0
    offloaded_g2_g3: int = 0
    offloaded_g1_g3: int = 0
    onboarded_g2_g1: int = 0
    onboarded_g3_g1: int = 0
    offloaded_bytes: int = 0
    onboarded_bytes: int = 0
    lookups: int = 0
    """Prefix lookups that went past G1."""
    looked_up_blocks: int = 0
    """Blocks those lookups asked the tiers for."""
    host_hit_blocks: int = 0
    disk_hit_blocks: int = 0
    onboard_seconds_total: float = 0.0
    onboards: int = 0
    disk_write_errors: int = 0
    disk_corrupt_blocks: int = 0
    disk_missing_blocks: int = 0
    dropped_offloads: int = 0


class EngineStats(msgspec.Struct):
    """An engine's load and counters: what the ``stats`` endpoint answers and the event plane
    publishes as load metrics."""

    num_running: int
    num_waiting: int
    kv_usage: float
    """Fraction of KV blocks referenced by requests (0-1)."""
    num_total_blocks: int
    num_free_blocks: int
    prefix_cache_hit_rate: float
    """Cached blocks found ÷ blocks looked up, since start."""
    num_preemptions: int
    prompt_tokens_total: int
    cached_prompt_tokens_total: int
    generation_tokens_total: int
    steps_total: int
    tiers: KvTierStats | None = None
    """The KV tiers below the pool; None without tiers."""


class StatsReply(EngineStats):
    """An engine's load and counters, plus the worker's disaggregation figures."""

    kv_exports_held: int = 0
    """Prefill exports waiting for a pull (0 on other roles)."""
    kv_blocks_imported: int = 0
    """Blocks pulled from prefill workers since start (decode side)."""


class KvDumpReply(msgspec.Struct):
    seq: int
    """The KV event sequence number the dump is current as of."""
    events: list[BlockStored]


class KvReleaseRequest(msgspec.Struct, forbid_unknown_fields=True):
    transfer_id: str


class KvReleaseReply(msgspec.Struct):
    released: bool
