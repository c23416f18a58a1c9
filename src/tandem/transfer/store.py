"""Where a prefill worker keeps finished prompts' KV blocks until a decode worker pulls them.

Each held export is released exactly once — "pulled" (a pull succeeded), "expired" (nobody
pulled it within ``ttl_s``) or "cancelled" (the request was aborted, or the store closed) — and
its ``on_release(transfer_id, reason)`` callback runs exactly once at that moment, so whatever the
holder attached to it (engine blocks, accounting) is freed on every path. Expiry runs on each
`hold` and `get`, and whenever the owner calls `expire` (the transfer server does, periodically).

Thread-safe: a lock guards the table; callbacks run outside it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from tandem.protocols.kv_export import KVBlockExport
from tandem.transfer.metrics import TransferMetrics
from tandem.transfer.wire import block_nbytes

logger = logging.getLogger(__name__)

ReleaseCallback = Callable[[str, str], None]
RELEASE_REASONS = ("pulled", "expired", "cancelled")


@dataclass(frozen=True)
class TransferStoreConfig:
    """How long a `TransferStore` keeps unpulled exports."""

    ttl_s: float = 60.0
    """Seconds an export waits for its pull before it expires and is freed."""

    def __post_init__(self) -> None:
        if self.ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {self.ttl_s}")


@dataclass(frozen=True)
class TransferStoreStats:
    """A snapshot of a store's contents and lifetime totals."""

    held: int
    """Exports held now."""
    held_bytes: int
    """Payload bytes of the exports held now."""
    pulled: int
    """Exports released because a pull succeeded."""
    expired: int
    """Exports released because their TTL passed."""
    cancelled: int
    """Exports released by cancellation (including `close`)."""


@dataclass
class _Entry:
    export: KVBlockExport
    deadline: float
    on_release: ReleaseCallback | None


class TransferStore:
    """Holds exports by transfer id until pulled, expired or cancelled (see module docstring)."""

    def __init__(
        self,
        config: TransferStoreConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        metrics: TransferMetrics | None = None,
    ) -> None:
        self.config = config or TransferStoreConfig()
        self._clock = clock
        self._metrics = metrics
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # deadline order (one TTL for all)
        self._held_bytes = 0
        self._released = dict.fromkeys(RELEASE_REASONS, 0)

    def hold(self, transfer_id: str, export: KVBlockExport, on_release: ReleaseCallback | None = None) -> None:
        """Keep ``export`` under ``transfer_id`` until it is pulled, expires or is cancelled.

        Raises ValueError (and holds nothing, calls nothing) for a duplicate id or an export whose
        payload size, hashes and tokens do not agree."""
        _check_export(transfer_id, export)
        self.expire()
        with self._lock:
            if transfer_id in self._entries:
                raise ValueError(f"transfer {transfer_id!r} is already held")
            self._entries[transfer_id] = _Entry(export, self._clock() + self.config.ttl_s, on_release)
            self._held_bytes += len(export.data)
        self._update_gauge()

    def get(self, transfer_id: str) -> KVBlockExport | None:
        """The held export, or None when unknown, released or expired."""
        self.expire()
        with self._lock:
            entry = self._entries.get(transfer_id)
            return None if entry is None else entry.export

    def release(self, transfer_id: str, reason: str = "cancelled") -> bool:
        """Free a held export and run its callback; False (and nothing else) if it is not held."""
        if reason not in RELEASE_REASONS:
            raise ValueError(f"release reason must be one of {RELEASE_REASONS}, got {reason!r}")
        with self._lock:
            entry = self._entries.pop(transfer_id, None)
            if entry is None:
                return False
            self._account(entry, reason)
        self._finish(transfer_id, entry, reason)
        return True

    def expire(self) -> list[str]:
        """Release every export past its deadline (reason "expired"); returns their ids."""
        now = self._clock()
        expired: list[tuple[str, _Entry]] = []
        with self._lock:
            while self._entries:
                transfer_id, entry = next(iter(self._entries.items()))
                if entry.deadline > now:
                    break
                del self._entries[transfer_id]
                self._account(entry, "expired")
                expired.append((transfer_id, entry))
        for transfer_id, entry in expired:
            self._finish(transfer_id, entry, "expired")
        return [transfer_id for transfer_id, _ in expired]

    def close(self) -> list[str]:
        """Release everything still held (reason "cancelled"); returns their ids."""
        with self._lock:
            entries = list(self._entries.items())
            self._entries.clear()
            for _, entry in entries:
                self._account(entry, "cancelled")
        for transfer_id, entry in entries:
            self._finish(transfer_id, entry, "cancelled")
        return [transfer_id for transfer_id, _ in entries]

    def stats(self) -> TransferStoreStats:
        with self._lock:
            return TransferStoreStats(
                len(self._entries),
                self._held_bytes,
                self._released["pulled"],
                self._released["expired"],
                self._released["cancelled"],
            )

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, transfer_id: object) -> bool:
        return transfer_id in self._entries

    def _account(self, entry: _Entry, reason: str) -> None:
        """Bookkeeping of one release (caller holds the lock)."""
        self._held_bytes -= len(entry.export.data)
        self._released[reason] += 1

    def _finish(self, transfer_id: str, entry: _Entry, reason: str) -> None:
        """Outside the lock: update the gauge and run the callback (its errors are logged, not raised)."""
        self._update_gauge()
        if entry.on_release is None:
            return
        try:
            entry.on_release(transfer_id, reason)
        except Exception:
            logger.exception("on_release callback of transfer %r (%s) failed", transfer_id, reason)

    def _update_gauge(self) -> None:
        if self._metrics is not None:
            self._metrics.held.set(len(self._entries))


def _check_export(transfer_id: str, export: KVBlockExport) -> None:
    """Refuse exports whose parts disagree, so a pull never serves a malformed payload."""
    if not isinstance(transfer_id, str) or not transfer_id:
        raise ValueError(f"transfer id must be a non-empty string, got {transfer_id!r}")
    num_blocks = len(export.block_hashes)
    if len(export.token_ids) != num_blocks * export.block_size:
        raise ValueError(
            f"transfer {transfer_id!r}: {len(export.token_ids)} token ids do not cover "
            f"{num_blocks} blocks of {export.block_size}"
        )
    expected = num_blocks * block_nbytes(list(export.block_shape), export.dtype)
    if len(export.data) != expected:
        raise ValueError(
            f"transfer {transfer_id!r}: payload is {len(export.data)} bytes, expected {expected} "
            f"({num_blocks} blocks of {export.block_shape} {export.dtype})"
        )
