"""Typed configuration of the KV tiers, with documented defaults."""

from __future__ import annotations

from dataclasses import dataclass

OFFLOAD_POLICIES = ("evict", "write-through")


@dataclass
class KvTierConfig:
    """Which tiers exist below the engine's pool and how blocks move between them."""

    host_cache_gib: float = 0.0
    """G2 (host memory) capacity in GiB; 0 = no host tier. With ``host_cache_shared`` this is the
    size of the node-wide pool when this worker creates it (a worker that attaches to an
    existing pool takes its size)."""
    host_cache_shared: str | None = None
    """Name of a node-wide host tier (a shared-memory segment ``/dev/shm/tandem-kv-<name>``) that
    every worker of this node naming it shares; None = a private host tier."""
    disk_cache_gib: float = 0.0
    """G3 (local disk) capacity in GiB; 0 = no disk tier."""
    disk_cache_dir: str | None = None
    """Directory of the disk tier's block files (required with ``disk_cache_gib``). Blocks found
    there at start are served again (the tier survives a restart)."""
    offload_policy: str = "write-through"
    """``write-through``: every newly computed full block is copied to G2 at the end of its step
    (the node-wide tier then sees blocks while they are still in this worker's G1, and a later
    eviction copies nothing); ``evict``: a full block is copied to G2 when G1 evicts it (inside
    the allocation that evicts it). docs/kv-tiers.md has the measurement behind the default."""
    disk_min_frequency: int = 2
    """A block leaving G2 is written to disk only if it was used at least this often (stored
    plus prefix hits); 1 writes every block. Dynamo's filter is the same idea (frequency ≥ 2)."""

    def __post_init__(self) -> None:
        if self.host_cache_gib < 0 or self.disk_cache_gib < 0:
            raise ValueError("tier capacities must be >= 0")
        if self.offload_policy not in OFFLOAD_POLICIES:
            raise ValueError(
                f"offload_policy must be one of {', '.join(OFFLOAD_POLICIES)}, got {self.offload_policy!r}"
            )
        if self.disk_cache_gib > 0 and not self.disk_cache_dir:
            raise ValueError("a disk tier (disk_cache_gib > 0) needs disk_cache_dir")
        if self.host_cache_shared is not None and not _is_segment_name(self.host_cache_shared):
            raise ValueError(
                f"host_cache_shared must be 1-64 letters, digits, '-', '_' or '.', got {self.host_cache_shared!r}"
            )
        if self.disk_min_frequency < 1:
            raise ValueError("disk_min_frequency must be >= 1")

    @property
    def enabled(self) -> bool:
        return self.host_cache_gib > 0 or self.host_cache_shared is not None or self.disk_cache_gib > 0


def _is_segment_name(name: str) -> bool:
    return 0 < len(name) <= 64 and all(c.isalnum() or c in "-_." for c in name) and not name.startswith(".")
