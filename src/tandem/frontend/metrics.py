"""Prometheus metrics of the frontend, and of its workers as last polled.

Each ``FrontendMetrics`` owns its registry (several frontends can live in one test process).
Worker figures (KV usage, prefix-cache hit rate, running/waiting requests) come from the
workers' ``stats`` endpoint, polled in the background by the frontend, and are exported with a
``worker_id`` label so one scrape of the frontend shows the whole deployment.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily

# Latency buckets in seconds: sub-millisecond ITLs on the mocker up to minute-long CPU requests.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_TOKEN_BUCKETS = (1, 8, 32, 128, 512, 1024, 2048, 4096, 8192, 16384, 32768)

# (name, help, EngineStats field)
_WORKER_GAUGES = (
    ("tandem_worker_kv_usage", "Fraction of the worker's KV blocks in use (0-1)", "kv_usage"),
    (
        "tandem_worker_prefix_cache_hit_rate",
        "Prefix-cache hits / lookups on the worker since start",
        "prefix_cache_hit_rate",
    ),
    ("tandem_worker_running_requests", "Requests running on the worker", "num_running"),
    ("tandem_worker_waiting_requests", "Requests waiting on the worker", "num_waiting"),
    ("tandem_worker_kv_blocks_total", "Size of the worker's KV block pool", "num_total_blocks"),
    ("tandem_worker_kv_blocks_free", "Free KV blocks on the worker", "num_free_blocks"),
    ("tandem_worker_preemptions", "Requests preempted on the worker since start", "num_preemptions"),
    ("tandem_worker_kv_exports_held", "Prefill exports the worker holds for a decode worker's pull", "kv_exports_held"),
    (
        "tandem_worker_kv_blocks_imported",
        "KV blocks the worker pulled from prefill workers since start",
        "kv_blocks_imported",
    ),
)


# KV tiers (EngineStats.tiers): (name, help, label name, {label value: KvTierStats field}).
_TIER_GAUGES = (
    (
        "tandem_worker_kv_tier_blocks",
        "KV blocks held in a tier below the worker's pool (host, disk)",
        "tier",
        {"host": "host_blocks", "disk": "disk_blocks"},
    ),
    (
        "tandem_worker_kv_tier_capacity_blocks",
        "Capacity of a KV tier below the worker's pool, in blocks",
        "tier",
        {"host": "host_capacity_blocks", "disk": "disk_capacity_blocks"},
    ),
    (
        "tandem_worker_kv_disk_writes_paused",
        "1 while the disk tier does not write (a failed write: full disk; or it is off: unusable directory)",
        "tier",
        {"disk": "disk_writes_paused"},
    ),
)
_TIER_COUNTERS = (
    (
        "tandem_worker_kv_offloaded_blocks",
        "KV blocks copied down a tier (g1 = the worker's pool, g2 = host memory, g3 = disk)",
        "path",
        {"g1_g2": "offloaded_g1_g2", "g2_g3": "offloaded_g2_g3", "g1_g3": "offloaded_g1_g3"},
    ),
    (
        "tandem_worker_kv_onboarded_blocks",
        "KV blocks brought back into the worker's pool from a tier",
        "path",
        {"g2_g1": "onboarded_g2_g1", "g3_g1": "onboarded_g3_g1"},
    ),
    (
        "tandem_worker_kv_tier_bytes",
        "Bytes of KV moved between the pool and its tiers",
        "direction",
        {"offload": "offloaded_bytes", "onboard": "onboarded_bytes"},
    ),
    (
        "tandem_worker_kv_tier_hit_blocks",
        "Prompt blocks found in a tier below the pool (after missing the pool)",
        "tier",
        {"host": "host_hit_blocks", "disk": "disk_hit_blocks"},
    ),
    (
        "tandem_worker_kv_tier_lookup_blocks",
        "Prompt blocks looked up in the tiers below the pool (the hit rate's denominator)",
        "tier",
        {"all": "looked_up_blocks"},
    ),
    (
        "tandem_worker_kv_disk_errors",
        "Disk tier failures: write errors, corrupt and missing block files",
        "kind",
        {"write": "disk_write_errors", "corrupt": "disk_corrupt_blocks", "missing": "disk_missing_blocks"},
    ),
)


class WorkerStatsCollector:
    """Exports the latest polled EngineStats of each worker (a custom Prometheus collector)."""

    def __init__(self) -> None:
        self.latest: dict[str, tuple[str, dict[str, Any]]] = {}
        """worker_id → (model, stats dict)."""

    def collect(self) -> Iterator[Metric]:
        for name, doc, field in _WORKER_GAUGES:
            family = GaugeMetricFamily(name, doc, labels=["model", "worker_id"])
            for worker_id, (model, stats) in sorted(self.latest.items()):
                value = stats.get(field)
                if isinstance(value, (int, float)):
                    family.add_metric([model, worker_id], float(value))
            yield family
        yield from self._collect_tiers()

    def _collect_tiers(self) -> Iterator[Metric]:
        tiered = [(wid, model, s["tiers"]) for wid, (model, s) in sorted(self.latest.items()) if s.get("tiers")]
        for kind, families in ((GaugeMetricFamily, _TIER_GAUGES), (CounterMetricFamily, _TIER_COUNTERS)):
            for name, doc, label, fields in families:
                family = kind(name, doc, labels=["model", "worker_id", label])
                for worker_id, model, tiers in tiered:
                    for label_value, field in fields.items():
                        value = tiers.get(field)
                        if field == "disk_writes_paused":  # a disk tier that is off writes nothing
                            value = value or tiers.get("disk_unavailable") is not None
                        family.add_metric([model, worker_id, label_value], float(value or 0))
                yield family
        onboard = SummaryMetricFamily(
            "tandem_worker_kv_onboard_seconds",
            "Time from a prefix hit in a tier to its blocks being in the worker's pool",
            labels=["model", "worker_id"],
        )
        for worker_id, model, tiers in tiered:
            onboard.add_metric([model, worker_id], tiers.get("onboards", 0), tiers.get("onboard_seconds_total", 0.0))
        yield onboard


# (name, help, key in KvRouter.status()["workers"][id])
_ROUTER_WORKER_GAUGES = (
    ("tandem_router_kv_events_received", "KV event batches the router applied from the worker", "events_received"),
    ("tandem_router_kv_last_seq", "Sequence number of the worker's latest KV event batch applied", "last_seq"),
    ("tandem_router_kv_blocks_indexed", "Blocks the router's index holds for the worker", "blocks_indexed"),
    ("tandem_router_kv_gaps_recovered", "Missed KV event batches recovered by replay or dump", "gaps_recovered"),
    (
        "tandem_router_kv_index_rebuilds",
        "Times the worker's index entries were dropped to rebuild from new events (a gap, no dump)",
        "index_rebuilds",
    ),
    (
        "tandem_router_kv_events_missing",
        "1 when the worker served requests but published no KV events",
        "events_missing",
    ),
)


class RouterStatsCollector:
    """Exports the routing policy's status (a callable returning KvRouter.status()) on scrape."""

    def __init__(self) -> None:
        self.status: Any = None

    def collect(self) -> Iterator[Metric]:
        status = self.status() if self.status is not None else None
        if not status or "workers" not in status:
            return
        for name, doc, key in (
            ("tandem_router_hit_rate", "Cached blocks / prompt blocks of routed requests", "hit_rate"),
            ("tandem_router_requests_routed", "Requests routed by the KV policy", "requests_routed"),
            (
                "tandem_router_overhead_ms_mean",
                "Mean routing time per request (hash, match, score)",
                "overhead_ms_mean",
            ),
        ):
            family = GaugeMetricFamily(name, doc)
            family.add_metric([], float(status[key]))
            yield family
        for name, doc, key in _ROUTER_WORKER_GAUGES:
            family = GaugeMetricFamily(name, doc, labels=["worker_id"])
            for worker_id, stats in sorted(status["workers"].items()):
                value = stats.get(key)
                if value is not None:
                    family.add_metric([worker_id], float(value))
            yield family


class FrontendMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "tandem_frontend_requests", "Finished HTTP requests by status", ["model", "endpoint", "status"], registry=r
        )
        self.inflight = Gauge("tandem_frontend_inflight_requests", "Requests being served", ["model"], registry=r)
        self.ttft = Histogram(
            "tandem_frontend_time_to_first_token_seconds",
            "Time to first token",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "tandem_frontend_inter_token_latency_seconds",
            "Time between output tokens",
            ["model"],
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "tandem_frontend_request_duration_seconds",
            "Whole request time",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.input_tokens = Histogram(
            "tandem_frontend_input_tokens", "Prompt tokens per request", ["model"], buckets=_TOKEN_BUCKETS, registry=r
        )
        self.output_tokens = Histogram(
            "tandem_frontend_output_tokens",
            "Completion tokens per request",
            ["model"],
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.cached_tokens = Counter(
            "tandem_frontend_cached_prompt_tokens", "Prompt tokens served from cache", ["model"], registry=r
        )
        self.cancellations = Counter(
            "tandem_frontend_cancellations", "Requests the client abandoned", ["model"], registry=r
        )
        self.disagg_requests = Counter(
            "tandem_frontend_disaggregated_requests",
            "Requests by how they ran when prefill workers existed: "
            "disaggregated (prefill + decode worker); whole on a decode worker: fallback (the prefill failed), "
            "local_short (prompt within --max-local-prefill-length), local_busy (prefill queue full)",
            ["model", "outcome"],
            registry=r,
        )
        self.migrations = Counter(
            "tandem_frontend_migrations",
            "Requests whose worker was lost mid-stream, by outcome: migrated (moved "
            "to another worker), exhausted (--migration-limit used up), disabled (limit 0), no_worker (no other "
            "worker took it over)",
            ["model", "outcome"],
            registry=r,
        )
        self.migration_limit = Gauge(
            "tandem_frontend_migration_limit",
            "Effective migration limit per request (--migration-limit, or its default from the live worker count)",
            ["model"],
            registry=r,
        )
        self.workers = Gauge("tandem_frontend_workers", "Live workers known to the frontend", ["model"], registry=r)
        self.worker_stats = WorkerStatsCollector()
        r.register(self.worker_stats)
        self.router_stats = RouterStatsCollector()
        r.register(self.router_stats)

    def render(self) -> bytes:
        return generate_latest(self.registry)
