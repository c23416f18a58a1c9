"""Prometheus metrics of the KV transfer service (client pulls, server failures, held exports).

Metrics are created against a given `CollectorRegistry`, so tests (or several services in one
process) use a fresh registry each; `default_metrics()` is the one shared instance on the
global registry, created on first use.
"""

from __future__ import annotations

import threading

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

# Pull durations: a few blocks over loopback up to multi-GB payloads across hosts.
_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class TransferMetrics:
    """The service's metrics, registered on ``registry`` (default: the global registry)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = REGISTRY if registry is None else registry
        self.bytes = Counter(
            "tandem_kv_transfer_bytes", "KV payload bytes pulled, by path (tcp|shm)", ["path"], registry=registry
        )
        self.seconds = Histogram(
            "tandem_kv_transfer_seconds",
            "Seconds per successful pull (connect to verified payload), by path",
            ["path"],
            buckets=_SECONDS_BUCKETS,
            registry=registry,
        )
        self.failures = Counter(
            "tandem_kv_transfer_failures",
            "Failed pulls, by side (client|server) and reason",
            ["side", "reason"],
            registry=registry,
        )
        self.held = Gauge(
            "tandem_kv_transfers_held", "Exports held by a prefill worker, waiting for a pull", registry=registry
        )

    def record_pull(self, path: str, nbytes: int, seconds: float) -> None:
        """One successful pull of ``nbytes`` over ``path``."""
        self.bytes.labels(path).inc(nbytes)
        self.seconds.labels(path).observe(seconds)

    def record_failure(self, side: str, reason: str) -> None:
        """One failed pull (``side`` is "client" or "server")."""
        self.failures.labels(side, reason).inc()


_default: TransferMetrics | None = None
_default_lock = threading.Lock()


def default_metrics() -> TransferMetrics:
    """The process-wide metrics on the global registry (created once)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = TransferMetrics()
        return _default
