"""Frontend settings, with the defaults `tandem frontend` and `tandem serve` use."""

from __future__ import annotations

from dataclasses import dataclass

from tandem.router.kv.cost import DEFAULT_PREFILL_LOAD_SCALE


@dataclass
class FrontendConfig:
    host: str = "127.0.0.1"
    """HTTP bind address. Loopback by default: exposing the API is an explicit choice."""
    port: int = 8000
    """HTTP port (0 picks a free one)."""
    router: str = "round-robin"
    """Routing policy: ``round-robin``, ``random``, ``kv`` (KV-cache aware), ``least-loaded``, or
    ``remote`` (ask the standalone router at ``router_address``)."""
    router_address: str | None = None
    """``remote``: host:port of a standalone `tandem router`."""
    kv_overlap_credit: float = 1.0
    """kv: weight of a cached block against a prefill block."""
    kv_prefill_load_scale: float = DEFAULT_PREFILL_LOAD_SCALE
    """kv: weight of prefill work against decode blocks (Dynamo's default: 1.0; see
    :data:`tandem.router.kv.cost.DEFAULT_PREFILL_LOAD_SCALE` for why Tandem's is higher)."""
    kv_temperature: float = 0.0
    """kv: 0 picks the cheapest worker; > 0 samples from a softmax over costs."""
    kv_host_credit: float = 0.75
    """kv: credit of a prompt block a worker holds in host memory (its pool's blocks get 1)."""
    kv_disk_credit: float = 0.25
    """kv: credit of a prompt block a worker holds on disk."""
    kv_events: bool = True
    """kv: index the workers' KV events (False: index the router's own decisions with a TTL)."""
    nats_url: str | None = None
    """kv: NATS server(s) of workers publishing KV events on NATS (``--event-plane nats``); None:
    the server named in their cards."""
    max_body_bytes: int = 4 * 1024 * 1024
    """Larger request bodies get 413."""
    default_max_tokens: int | None = None
    """Completion length when a request names none; None means up to the context length."""
    max_attempts: int = 3
    """Workers tried for one request when the chosen one cannot be reached."""
    migration_limit: int | None = None
    """Times one request may move to another worker when its worker is lost mid-stream (the
    new worker continues from the tokens generated so far; see tandem.router.dispatch.migration).
    None: 1 when more than one worker serves the model, else 0; 0 turns migration off."""
    worker_down_s: float = 5.0
    """How long a worker that did not answer is skipped before it is tried again."""
    worker_stats_interval_s: float = 2.0
    """How often workers' stats are polled for /metrics and /health (0 disables)."""
    max_local_prefill_length: int = 64
    """Disaggregated serving: prompts of at most this many tokens are prefilled on the decode
    worker instead of a prefill worker (only matters when prefill workers exist)."""
    max_prefill_queue_size: int = 8
    """Disaggregated serving: prefill on the decode worker when this frontend already has this
    many prefill halves in flight per live prefill worker (all busy); 0 = never."""
    access_log: bool = False
    """Log every HTTP request (off by default: it costs throughput)."""
    drain_timeout_s: float = 10.0
    """On shutdown, seconds requests in flight get to finish (the listening socket is closed at
    once); past it, streams end with an SSE error event and whole responses with a 503.
    `tandem serve` gives its workers the same drain timeout."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be at least 1024, got {self.max_body_bytes}")
        if self.default_max_tokens is not None and self.default_max_tokens < 1:
            raise ValueError(f"default_max_tokens must be positive, got {self.default_max_tokens}")
        if self.router == "remote" and not self.router_address:
            raise ValueError("router 'remote' needs router_address (host:port of `tandem router`)")
        if self.max_local_prefill_length < 0:
            raise ValueError(f"max_local_prefill_length must be >= 0, got {self.max_local_prefill_length}")
        if self.max_prefill_queue_size < 0:
            raise ValueError(f"max_prefill_queue_size must be >= 0, got {self.max_prefill_queue_size}")
        if self.migration_limit is not None and self.migration_limit < 0:
            raise ValueError(f"migration_limit must be >= 0, got {self.migration_limit}")
        if self.drain_timeout_s < 0:
            raise ValueError(f"drain_timeout_s must be >= 0, got {self.drain_timeout_s}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
