"""Where KV events travel (``--event-plane``): the event plane's configuration and defaults."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_NAMESPACE = "tandem"
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
EVENT_PLANES = ("zmq", "nats")


@dataclass(frozen=True)
class EventPlaneConfig:
    """How KV events and load metrics travel from workers to routers."""

    kind: str = "zmq"
    """``zmq``: each worker binds a PUB socket and a replay socket (no broker, the default).
    ``nats``: workers publish to per-namespace subjects of a NATS JetStream stream, so every
    router replica receives them and one that restarts or falls behind replays what it missed."""
    nats_url: str = DEFAULT_NATS_URL
    """``nats``: the server(s) to connect to (comma-separated URLs)."""
    namespace: str = DEFAULT_NAMESPACE
    """Subjects and stream names are scoped by this, so deployments can share one NATS."""

    def __post_init__(self) -> None:
        if self.kind not in EVENT_PLANES:
            raise ValueError(f"event plane must be one of {EVENT_PLANES}, got {self.kind!r}")
        if not self.namespace or not all(c.isalnum() or c in "-_" for c in self.namespace):
            raise ValueError(f"namespace must be non-empty letters, digits, '-' or '_', got {self.namespace!r}")
