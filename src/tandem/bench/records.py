"""What a benchmark run writes: one record per request, and the run's summary.

A run directory holds ``summary.json`` (:class:`RunSummary` as JSON), ``requests.jsonl`` (one
:class:`RequestRecord` per line) and ``requests.csv`` (the same, flat). Times are seconds;
``start_s`` is relative to the run's start, so runs compare by shape, not wall clock.
"""

from __future__ import annotations

from typing import Any

import msgspec


class RequestRecord(msgspec.Struct, omit_defaults=True):
    index: int
    """Order in which the request was issued (0-based, warm-up excluded)."""
    start_s: float
    """When it was sent, seconds since the run started."""
    ok: bool
    ttft_s: float | None = None
    """Time to the first content token."""
    e2e_s: float | None = None
    """Time to the end of the response."""
    itl_s: list[float] = msgspec.field(default_factory=list)
    """Gaps between consecutive content events after the first (AIPerf's and vLLM's inter-token latency)."""
    input_tokens: int = 0
    """Prompt tokens (from ``usage``, else as built)."""
    output_tokens: int = 0
    """Completion tokens (from ``usage``, else counted content events)."""
    cached_tokens: int = 0
    """``usage.prompt_tokens_details.cached_tokens`` when the server reports it."""
    error: str | None = None
    """Error kind when not ok: ``http_4xx``, ``http_5xx``, ``timeout``, ``connection``, ``stream``, ``cancelled``."""
    error_detail: str | None = None
    session_id: str | None = None
    """Multi-turn: the simulated user."""
    turn: int | None = None
    """Multi-turn: 0-based round of that user."""


class Percentiles(msgspec.Struct):
    mean: float
    p50: float
    p90: float
    p99: float
    min: float
    max: float


class RunSummary(msgspec.Struct):
    name: str
    """Label of the run (``--name``, default the workload and load shape)."""
    url: str
    model: str
    workload: str
    load: str
    """e.g. ``concurrency=8`` or ``rate=4.0/s poisson``."""
    settings: dict[str, Any]
    """Every option the run used (for reproduction)."""
    started_at: float
    """Unix time of the start."""
    duration_s: float
    requests_sent: int
    requests_ok: int
    errors: dict[str, int]
    """Failed requests by error kind."""
    request_throughput: float
    """Successful requests per second."""
    output_token_throughput: float
    """Output tokens per second (successful requests)."""
    input_token_throughput: float
    total_input_tokens: int
    total_output_tokens: int
    total_cached_tokens: int
    ttft_ms: Percentiles | None
    itl_ms: Percentiles | None
    e2e_ms: Percentiles | None
    output_tokens_per_request: Percentiles | None
    goodput: float | None = None
    """Requests per second that met every SLO (None without ``--slo``)."""
    slo: dict[str, float] | None = None
    """The SLOs, e.g. ``{"ttft_ms": 500, "itl_ms": 50}``."""
    client_cpu_percent: float = 0.0
    """CPU the benchmark process used, percent of one core, averaged over the run."""
    target_rate: float | None = None
    """Requested request rate (rate mode), for throughput-vs-rate plots."""
    concurrency: int | None = None
