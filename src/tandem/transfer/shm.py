"""Shared-memory segments for same-host KV transfers: create, attach, destroy, and a reuse pool.

Segments are POSIX shared memory (`multiprocessing.shared_memory`) named ``tandem_kv_<pid>_<rand>``
so a leak is easy to spot in /dev/shm. The creating process registers each segment with
multiprocessing's resource tracker, which unlinks it if that process dies without doing so; an
attaching process unregisters its copy of the registration (Python 3.11 registers on attach too),
so its exit never unlinks a segment it does not own.

Fresh shared memory costs a page fault per 4 KiB page on first touch (tmpfs gets no huge pages
by default), and even mapping an existing segment costs a page-table entry per page — each about
as slow as copying the bytes. So both sides keep mappings: the server's `SegmentPool` keeps
segments a client has finished with (its ShmDone message) for the next pull, up to a byte cap,
and the client's `AttachCache` keeps pooled segments it attached mapped, so a reused segment
costs neither side a fault. A cached mapping whose segment the server unlinked (st_nlink 0) is
dropped on the next attach; the cache is bounded too.
"""

from __future__ import annotations

import logging
import mmap
import os
import secrets
from collections import OrderedDict
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory
from typing import Protocol, cast

logger = logging.getLogger(__name__)

SEGMENT_PREFIX = "tandem_kv_"
SHM_DIR = "/dev/shm"
_ROUND_BYTES = 2 * 2**20  # pooled segment sizes round up to this, so similar payloads share segments
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux >= 5.14; 3.11 lacks the names
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)

_created_here: set[str] = set()  # segments this process created (and tracks)


def create_segment(size: int) -> SharedMemory:
    """A new segment of ``size`` bytes (> 0), pages pre-faulted for writing where the kernel can."""
    name = f"{SEGMENT_PREFIX}{os.getpid()}_{secrets.token_hex(6)}"
    segment = SharedMemory(name=name, create=True, size=size)
    _created_here.add(segment.name)
    _advise(segment, _MADV_POPULATE_WRITE)
    return segment


def attach_segment(name: str) -> SharedMemory:
    """Map an existing segment read/write without taking ownership of it.

    FileNotFoundError when no such segment is visible (another host, or another /dev/shm)."""
    if not name.startswith(SEGMENT_PREFIX) or "/" in name:
        raise ValueError(f"not a KV transfer segment name: {name!r}")
    segment = SharedMemory(name=name, create=False)
    if segment.name not in _created_here:
        resource_tracker.unregister(_internals(segment)._name, "shared_memory")
    _advise(segment, _MADV_POPULATE_READ)
    return segment


def detach_segment(segment: SharedMemory) -> bool:
    """Unmap ``segment``; False when views of its buffer are still alive (it stays mapped until
    they are garbage collected)."""
    try:
        segment.close()
    except BufferError:
        return False
    return True


def destroy_segment(segment: SharedMemory) -> None:
    """Unmap and unlink a segment this process created (idempotent; never raises)."""
    if not detach_segment(segment):
        logger.debug("segment %s still has views; unlinking it anyway", segment.name)
    if segment.name in _created_here:
        _created_here.discard(segment.name)
        try:
            segment.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.warning("cannot unlink shared memory segment %s: %s", segment.name, exc)


def list_segments() -> list[str]:
    """Names of this service's segments visible in /dev/shm (all processes)."""
    try:
        return sorted(name for name in os.listdir(SHM_DIR) if name.startswith(SEGMENT_PREFIX))
    except OSError:
        return []


class _SharedMemoryInternals(Protocol):
    """CPython's private SharedMemory attributes this module relies on (typeshed leaves them out)."""

    _name: str
    """The name as registered with the resource tracker (with a leading "/" on POSIX)."""
    _fd: int
    _mmap: mmap.mmap


def _internals(segment: SharedMemory) -> _SharedMemoryInternals:
    return cast(_SharedMemoryInternals, segment)


def _advise(segment: SharedMemory, advice: int) -> None:
    try:
        _internals(segment)._mmap.madvise(advice)
    except (AttributeError, OSError, ValueError):
        pass  # old kernel or no madvise: pages fault in on first touch instead


class SegmentPool:
    """Idle segments kept for reuse, at most ``max_idle_bytes`` in all (0 disables reuse)."""

    def __init__(self, max_idle_bytes: int) -> None:
        self.max_idle_bytes = max_idle_bytes
        self._idle: list[SharedMemory] = []  # oldest first
        self._idle_bytes = 0
        self.created = 0
        """Segments created (pool misses), for tests and benchmarks."""

    @property
    def enabled(self) -> bool:
        return self.max_idle_bytes > 0

    @property
    def idle_bytes(self) -> int:
        return self._idle_bytes

    def acquire(self, nbytes: int) -> SharedMemory:
        """An idle segment of at least ``nbytes`` (at most twice that), else a new one."""
        best = None
        for segment in self._idle:
            if nbytes <= segment.size <= 2 * max(nbytes, _ROUND_BYTES) and (best is None or segment.size < best.size):
                best = segment
        if best is not None:
            self._idle.remove(best)
            self._idle_bytes -= best.size
            return best
        self.created += 1
        size = -(-nbytes // _ROUND_BYTES) * _ROUND_BYTES if self.enabled else nbytes
        return create_segment(size)

    def recycle(self, segment: SharedMemory) -> None:
        """Take back a segment no client maps any more; evicts the oldest idle ones over the cap."""
        if segment.size > self.max_idle_bytes:
            destroy_segment(segment)
            return
        while self._idle and self._idle_bytes + segment.size > self.max_idle_bytes:
            evicted = self._idle.pop(0)
            self._idle_bytes -= evicted.size
            destroy_segment(evicted)
        self._idle.append(segment)
        self._idle_bytes += segment.size

    def close(self) -> None:
        """Unlink every idle segment."""
        while self._idle:
            destroy_segment(self._idle.pop())
        self._idle_bytes = 0


class AttachCache:
    """Client-side mappings of pooled segments, kept for reuse, at most ``max_bytes`` in all.

    A segment is only ever handed to one pull at a time (the server reuses it after ShmDone), so
    a cached mapping is never read by two pulls at once."""

    def __init__(self, max_bytes: int = 1 << 30) -> None:
        self.max_bytes = max_bytes
        self._segments: OrderedDict[str, SharedMemory] = OrderedDict()  # least recently used first

    def attach(self, name: str) -> SharedMemory:
        """The cached mapping of ``name``, or a new one (FileNotFoundError when not visible)."""
        self._drop_unlinked()
        segment = self._segments.pop(name, None) or attach_segment(name)
        self._segments[name] = segment
        total = sum(cached.size for cached in self._segments.values())
        while total > self.max_bytes and len(self._segments) > 1:
            _, evicted = self._segments.popitem(last=False)
            total -= evicted.size
            detach_segment(evicted)
        return segment

    def forget(self, name: str) -> None:
        """Unmap ``name`` (after a failed pull: the server will not reuse that segment)."""
        segment = self._segments.pop(name, None)
        if segment is not None:
            detach_segment(segment)

    def clear(self) -> None:
        """Unmap every cached segment."""
        while self._segments:
            detach_segment(self._segments.popitem()[1])

    def __len__(self) -> int:
        return len(self._segments)

    def _drop_unlinked(self) -> None:
        for name, segment in list(self._segments.items()):
            try:
                unlinked = os.fstat(_internals(segment)._fd).st_nlink == 0
            except OSError:
                unlinked = True
            if unlinked:
                del self._segments[name]
                detach_segment(segment)


attach_cache = AttachCache()
"""The process's client-side mapping cache (used by `tandem.transfer.client`)."""
