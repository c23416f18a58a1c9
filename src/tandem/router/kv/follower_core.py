"""What every KV event follower does, whatever carries the events (ZMQ or NATS).

A follower keeps one worker's part of the router's index current. Batches carry the worker's
sequence number; the core applies them in order and keeps ``stats.last_seq``:

* a batch at or below ``last_seq`` is already covered (by a dump or a replay) and skipped;
* a batch that skips ahead means some went missing: the transport's ``_replay`` re-reads them
  (ZMQ: the worker's replay socket; NATS: the JetStream stream), and when it cannot return
  them all, in order, from ``last_seq + 1``, the core takes a full dump over the request plane
  (``kv_dump``: every block the worker holds, as of a sequence number, in every tier, each
  ``BlockStored`` with its ``medium``). The dump is applied after an ``AllBlocksCleared``, which
  clears the worker's own tiers but not a node-wide host tier it shares with other workers
  (their blocks are there too); the dump's host blocks are stored into it again, which changes
  nothing for those it still has;
* a worker that serves no dump (``card.serves_kv_dump`` false: vLLM) has its entries dropped
  instead, and the index rebuilds from its next events (vLLM re-announces a cached block when a
  request that asks with ``kv_cache_report_mode: full`` reuses it), so the router under-credits
  that worker for a while but never routes on blocks it does not know are gone.

Subclasses provide ``_run`` (receive batches, call ``_receive``), ``_replay`` and ``_close``.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import msgspec

from tandem.protocols.endpoints import Endpoint, KvDumpReply
from tandem.protocols.kv_events import AllBlocksCleared, KVEventBatch, decode_batch
from tandem.protocols.worker_card import WorkerCard
from tandem.router.kv.indexer import KvIndexer
from tandem.runtime.request_plane import RequestPlaneClient, RequestPlaneError

logger = logging.getLogger(__name__)

MAX_ERRORS_KEPT = 20
"""Latest error messages kept in ``FollowerStats.errors``."""


@dataclass
class FollowerStats:
    batches_received: int = 0
    """Event batches applied from the live stream."""
    last_seq: int = -1
    """Sequence number of the latest batch applied (from the stream, a replay or a dump)."""
    gaps_recovered: int = 0
    """Missed batches detected and recovered (by replay or dump)."""
    dumps: int = 0
    """Full dumps taken (at discovery, and when a replay could not close a gap)."""
    malformed: int = 0
    """Messages that did not decode (dropped)."""
    replayed: int = 0
    """Batches applied from a replay (a gap, or a router rebuilding from a stream's history)."""
    rebuilds: int = 0
    """Times the worker's entries were dropped to rebuild from new events (a gap on a worker
    without ``kv_dump``)."""
    errors: list[str] = field(default_factory=list)

    def error(self, message: str) -> None:
        self.errors.append(message)
        del self.errors[:-MAX_ERRORS_KEPT]


class KvEventFollowerCore:
    """Apply one worker's batches in seq order; close gaps by replay, else by a dump."""

    transport = "none"

    def __init__(self, card: WorkerCard, indexer: KvIndexer, client: RequestPlaneClient) -> None:
        self.card, self.indexer, self.client = card, indexer, client
        self.stats = FollowerStats()
        self._task: asyncio.Task[None] | None = None

    # --- lifecycle ---

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"kv-events-{self.card.worker_id}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._close()

    # --- transport hooks ---

    async def _run(self) -> None:
        raise NotImplementedError

    async def _replay(self, want: int, until: int) -> list[tuple[int, bytes]]:
        """Batches from seq ``want`` on (at least up to ``until - 1`` when it can), in order; an
        empty list when this transport cannot replay."""
        return []

    async def _close(self) -> None:
        pass

    # --- the core ---

    async def _receive(self, seq: int, payload: bytes) -> None:
        """One batch from the live stream."""
        try:
            batch = decode_batch(payload)
        except (msgspec.DecodeError, TypeError):
            self.stats.malformed += 1
            return
        if seq <= self.stats.last_seq:
            return  # already covered by a dump or a replay
        if seq > self.stats.last_seq + 1:
            await self._recover(seq)
            if seq <= self.stats.last_seq:
                return
        self._apply(seq, batch)
        self.stats.batches_received += 1

    def _apply(self, seq: int, batch: KVEventBatch) -> None:
        for event in batch.events:
            self.indexer.apply(self.card.worker_id, event)
        self.stats.last_seq = seq

    async def _recover(self, seq: int) -> None:
        """Batches last_seq+1 .. seq-1 went missing: replay them, or dump when that fails."""
        self.stats.gaps_recovered += 1
        want = self.stats.last_seq + 1
        if self.apply_replayed(await self._replay(want, seq)) and self.stats.last_seq >= seq - 1:
            return
        if not self.card.serves_kv_dump:
            logger.warning(
                "worker %s: batches %d..%d cannot be replayed and it serves no dump; dropping its "
                "index entries to rebuild them from new events",
                self.card.worker_id,
                want,
                seq - 1,
            )
            self._rebuild(seq - 1)
            return
        logger.info("worker %s: batches %d..%d cannot be replayed; taking a dump", self.card.worker_id, want, seq - 1)
        await self._dump()

    def _rebuild(self, last_lost_seq: int) -> None:
        """Forget what the index holds for this worker; batches after ``last_lost_seq`` rebuild it."""
        self.indexer.apply(self.card.worker_id, AllBlocksCleared())
        self.stats.last_seq = last_lost_seq
        self.stats.rebuilds += 1

    def apply_replayed(self, batches: list[tuple[int, bytes]]) -> bool:
        """Apply replayed batches that continue ``last_seq`` without a hole; False if the first
        one does not (nothing applied then)."""
        if not batches or batches[0][0] > self.stats.last_seq + 1:
            return False
        for seq, payload in batches:
            if seq <= self.stats.last_seq:
                continue
            if seq != self.stats.last_seq + 1:
                break
            try:
                batch = decode_batch(payload)
            except (msgspec.DecodeError, TypeError):
                self.stats.malformed += 1
                break
            self._apply(seq, batch)
            self.stats.replayed += 1
        return True

    async def _dump(self) -> None:
        if not self.card.serves_kv_dump:
            return  # nothing to ask: the index starts empty and fills from the worker's events
        try:
            reply = await self.client.call(self.card.request_plane_address, Endpoint.KV_DUMP, None, timeout=10.0)
            dump = msgspec.convert(reply, KvDumpReply)
            events, dump_seq = dump.events, dump.seq
        except RequestPlaneError as exc:
            self.stats.error(f"dump failed: {exc}")
            logger.warning("worker %s: KV dump failed: %s", self.card.worker_id, exc)
            return
        except (msgspec.ValidationError, KeyError, TypeError, ValueError) as exc:
            self.stats.error(f"malformed dump: {exc}")
            logger.warning("worker %s: malformed KV dump: %s", self.card.worker_id, exc)
            return
        self.indexer.apply(self.card.worker_id, AllBlocksCleared())
        for event in events:
            self.indexer.apply(self.card.worker_id, event)
        self.stats.last_seq = max(self.stats.last_seq, dump_seq)
        self.stats.dumps += 1
