"""File discovery: one JSON file per worker in a directory on this machine (the default).

Layout: ``DIR/<worker_id>.json`` holds a :class:`FileRecord` (the card, its lease id and an
expiry time on the wall clock). Rules that make it safe with many processes at once:

- Writers never modify a file in place: they write ``DIR/.<name>.<pid>.<random>.tmp`` and
  ``os.replace`` it over the target, so a reader sees the old file or the new one, never half.
- The owner's heartbeat rewrites its file with a fresh expiry every ``ttl * heartbeat_fraction``.
  A process killed with SIGKILL stops refreshing, and readers ignore its file once the expiry
  passes (and delete it, opportunistically).
- Readers skip names that are not ``*.json`` or start with a dot, and ignore files that fail to
  parse (logged once at debug level).
- A scan re-reads a file only when its (inode, mtime, size) changed; a rewrite always makes a
  new inode, so an unchanged key means unchanged content.

All clocks are ``time.time()`` so that expiries compare across processes.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import msgspec

from tandem.protocols.worker_card import WorkerCard
from tandem.runtime.discovery.base import (
    DiscoveryConfig,
    Lease,
    Snapshot,
    SnapshotDiscovery,
    WorkerAlreadyRegisteredError,
)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
STALE_TMP_AGE_S = 60.0
"""Temporary files older than this are leftovers of a writer that died mid-write: deleted."""

_SAFE_NAME = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_.\-]{0,127}$")


class FileRecord(msgspec.Struct, kw_only=True):
    """The content of one discovery file."""

    format_version: int = FORMAT_VERSION
    lease_id: str
    ttl_s: float
    expires_at: float
    """Wall-clock time (Unix seconds) after which the entry is dead."""
    pid: int
    hostname: str
    card: WorkerCard


_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder(FileRecord)


def default_directory() -> Path:
    """``$TANDEM_CACHE_DIR/discovery``, else ``~/.cache/tandem/discovery``."""
    return Path(os.environ.get("TANDEM_CACHE_DIR") or "~/.cache/tandem").expanduser() / "discovery"


def file_name_for(worker_id: str) -> str:
    """The file name of ``worker_id``: itself when filesystem-safe, else a sanitized form + hash."""
    if _SAFE_NAME.match(worker_id):
        return f"{worker_id}.json"
    digest = hashlib.blake2b(worker_id.encode(), digest_size=8).hexdigest()
    cleaned = re.sub(r"[^A-Za-z0-9_\-]", "_", worker_id)[:64]
    return f"{cleaned}-{digest}.json"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old or the new content."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_record(path: Path) -> FileRecord | None:
    """The record in ``path``; None when it is missing or malformed (logged at debug level)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.debug("discovery: cannot read %s: %s", path, exc)
        return None
    try:
        return _DECODER.decode(data)
    except msgspec.DecodeError as exc:
        log.debug("discovery: ignoring malformed file %s: %s", path, exc)
        return None


# (inode, mtime_ns, size): changes whenever the file is replaced.
_StatKey = tuple[int, int, int]


@dataclass
class _Cached:
    key: _StatKey
    record: FileRecord | None


def _stat_key(st: os.stat_result) -> _StatKey:
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class FileDiscovery(SnapshotDiscovery):
    """Discovery through a directory shared by the processes of one machine."""

    def __init__(self, directory: str | os.PathLike[str] | None = None, config: DiscoveryConfig | None = None) -> None:
        super().__init__(config)
        self.directory = Path(directory).expanduser() if directory else default_directory()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._cache: dict[str, _Cached] = {}
        self._scan_lock = threading.Lock()  # scans run in worker threads; one at a time

    def path_for(self, worker_id: str) -> Path:
        """The file that holds ``worker_id``'s entry."""
        return self.directory / file_name_for(worker_id)

    async def _put(self, card: WorkerCard, lease: Lease) -> None:
        is_new = await asyncio.to_thread(self._write_entry, card, lease)
        if is_new:
            self._wake_local_watchers()

    async def _delete(self, worker_id: str, lease_id: str) -> None:
        if await asyncio.to_thread(self._delete_entry, worker_id, lease_id):
            self._wake_local_watchers()

    async def _snapshot(self) -> Snapshot:
        return await asyncio.to_thread(self.scan)

    def _wake_local_watchers(self) -> None:
        # Watchers of this client see its own changes at once; other processes' on the next poll.
        for waiter in list(self._waiters):
            waiter.notify()

    def _write_entry(self, card: WorkerCard, lease: Lease) -> bool:
        """Write the entry with a fresh expiry; True when it is new or changed its card."""
        path = self.path_for(card.worker_id)
        now = time.time()
        current = read_record(path)
        if current is not None and current.lease_id != lease.lease_id and current.expires_at > now:
            raise WorkerAlreadyRegisteredError(
                f"worker_id {card.worker_id!r} is already registered by pid {current.pid} "
                f"on {current.hostname} ({path})"
            )
        record = FileRecord(
            lease_id=lease.lease_id,
            ttl_s=lease.ttl_s,
            expires_at=now + lease.ttl_s,
            pid=os.getpid(),
            hostname=socket.gethostname(),
            card=card,
        )
        atomic_write_bytes(path, _ENCODER.encode(record))
        return current is None or current.lease_id != lease.lease_id or current.card != card

    def _delete_entry(self, worker_id: str, lease_id: str) -> bool:
        """Delete the entry if ``lease_id`` still owns it; True when something was deleted."""
        path = self.path_for(worker_id)
        current = read_record(path)
        if current is None or current.lease_id != lease_id:
            return False
        path.unlink(missing_ok=True)
        return True

    def scan(self) -> Snapshot:
        """Read the directory: live entries by worker_id. Blocking; ``list``/``watch`` call it
        in a thread."""
        with self._scan_lock:
            now = time.time()
            live: dict[str, FileRecord] = {}
            present: set[str] = set()
            with os.scandir(self.directory) as entries:
                for entry in entries:
                    if entry.name.startswith("."):
                        self._maybe_remove_stale_tmp(entry, now)
                        continue
                    if not entry.name.endswith(".json"):
                        continue
                    present.add(entry.name)
                    record = self._read_cached(entry)
                    if record is None:
                        continue
                    if record.expires_at <= now:
                        self._remove_expired(entry.name)
                        continue
                    previous = live.get(record.card.worker_id)
                    if previous is None or previous.expires_at < record.expires_at:
                        live[record.card.worker_id] = record
            for name in self._cache.keys() - present:
                del self._cache[name]
            return {wid: (r.lease_id, r.card) for wid, r in live.items()}

    def _read_cached(self, entry: os.DirEntry[str]) -> FileRecord | None:
        """The record of ``entry``, re-read only when its stat key changed."""
        try:
            key = _stat_key(entry.stat())
        except FileNotFoundError:
            return None
        cached = self._cache.get(entry.name)
        if cached is not None and cached.key == key:
            return cached.record
        record = read_record(Path(entry.path))
        self._cache[entry.name] = _Cached(key, record)
        return record

    def _remove_expired(self, name: str) -> None:
        """Delete an expired file unless its owner replaced it since we read it."""
        # The owner may rewrite the file between our stat and unlink; then a live entry is
        # lost until its next heartbeat (ttl * heartbeat_fraction). The owner had already
        # missed a whole TTL of heartbeats, so that window only opens for a dying worker.
        path = self.directory / name
        cached = self._cache.get(name)
        try:
            if cached is not None and _stat_key(path.stat()) == cached.key:
                path.unlink()
                log.debug("discovery: removed expired entry %s", path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.debug("discovery: cannot remove expired %s: %s", path, exc)

    def _maybe_remove_stale_tmp(self, entry: os.DirEntry[str], now: float) -> None:
        """Delete a temporary file left by a writer that died between write and rename."""
        if not entry.name.endswith(".tmp"):
            return
        try:
            if now - entry.stat().st_mtime > STALE_TMP_AGE_S:
                os.unlink(entry.path)
        except OSError:
            pass
