"""The memory behind a host tier: a slot table and a data area, private or node-wide.

A private tier lives in this process's memory. A node-wide tier is one file in ``/dev/shm``
that every worker of the node maps: the slot table (what each slot holds) and the block bytes
side by side, guarded by an ``flock`` on that file. Why this layout rather than an index
process: nothing extra to start, supervise or restart; the kernel drops a dead process's flock,
so a worker SIGKILLed inside a critical section cannot wedge the others; and the slot table is
the only index (each process keeps a private ``hash -> slot`` memo that it re-checks against
the table), so there is no second structure a crash could leave inconsistent. A slot a dead
worker was writing is recognised by its owner pid and reclaimed. The space is reserved with
``posix_fallocate`` at creation, so a full ``/dev/shm`` is an error at start, never a SIGBUS
while serving.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import xxhash

MAGIC = 0x5441_4E44_4B56_4732  # "TANDKVG2"
LAYOUT_VERSION = 1
SHM_DIR = "/dev/shm"

FREE, WRITING, READY = 0, 1, 2
"""Slot states."""

HEADER = np.dtype(
    [
        ("magic", "<u8"),
        ("version", "<u4"),
        ("ready", "<u4"),
        ("num_slots", "<u8"),
        ("block_bytes", "<u8"),
        ("block_size", "<u4"),
        ("pad", "<u4"),
        ("fingerprint", "<u8"),
        ("tick", "<u8"),
        ("next_version", "<u8"),
    ]
)
_HEADER_BYTES = 4096
_SLOT_FIELDS = (
    ("hash", "<u8"),
    ("parent", "<u8"),
    ("seed", "<u8"),
    ("has_parent", "<u1"),
    ("state", "<u1"),
    ("owner", "<i4"),
    ("version", "<u8"),
    ("tick", "<u8"),
    ("frequency", "<u4"),
)


class SegmentError(RuntimeError):
    """The node-wide segment cannot be created or does not fit this worker."""


def layout_fingerprint(layout_id: str) -> int:
    """64-bit id of a KV layout (model, dtype, block shape): blocks are shared only between
    engines whose layouts match."""
    return xxhash.xxh3_64_intdigest(layout_id.encode())


def segment_path(name: str) -> str:
    return os.path.join(SHM_DIR, f"tandem-kv-{name}")


def _align(n: int, to: int) -> int:
    return -(-n // to) * to


def _layout(num_slots: int, block_size: int, block_bytes: int) -> tuple[dict[str, int], int, int]:
    """(offset of each slot array, offset of the data area, total bytes)."""
    offsets: dict[str, int] = {}
    at = _HEADER_BYTES
    for name, dtype in (*_SLOT_FIELDS, ("tokens", "<u4")):
        offsets[name] = at
        count = num_slots * (block_size if name == "tokens" else 1)
        at = _align(at + count * np.dtype(dtype).itemsize, 64)
    data_at = _align(at, 4096)
    return offsets, data_at, data_at + num_slots * block_bytes


@dataclass
class SlotArrays:
    """Numpy views of the slot table (one entry per slot) and the raw data area."""

    header: np.ndarray
    hash: np.ndarray
    parent: np.ndarray
    seed: np.ndarray
    has_parent: np.ndarray
    state: np.ndarray
    owner: np.ndarray
    version: np.ndarray
    tick: np.ndarray
    frequency: np.ndarray
    tokens: np.ndarray  # [num_slots, block_size]
    data: memoryview | bytearray  # num_slots * block_bytes bytes


def _views(buffer: mmap.mmap | bytearray, num_slots: int, block_size: int, block_bytes: int) -> SlotArrays:
    offsets, data_at, total = _layout(num_slots, block_size, block_bytes)
    fields = {
        name: np.ndarray((num_slots,), dtype=dtype, buffer=buffer, offset=offsets[name]) for name, dtype in _SLOT_FIELDS
    }
    tokens = np.ndarray((num_slots, block_size), dtype="<u4", buffer=buffer, offset=offsets["tokens"])
    header = np.ndarray((1,), dtype=HEADER, buffer=buffer, offset=0)
    return SlotArrays(header=header, tokens=tokens, data=memoryview(buffer)[data_at:total], **fields)


class HostSegment:
    """A host tier's memory and its lock. ``private`` for one engine, ``attach`` for a node."""

    def __init__(
        self, arrays: SlotArrays, num_slots: int, fd: int | None, mm: mmap.mmap | None, name: str | None
    ) -> None:
        self.arrays = arrays
        self.num_slots = num_slots
        self.name = name
        """The node-wide segment's name; None for a private tier."""
        self._fd, self._mm = fd, mm
        self._thread_lock = threading.Lock()

    @property
    def shared(self) -> bool:
        return self._fd is not None

    @classmethod
    def private(cls, num_slots: int, block_size: int, block_bytes: int, fingerprint: int) -> HostSegment:
        _, _, total = _layout(num_slots, block_size, block_bytes)
        buffer = bytearray(total)
        arrays = _views(buffer, num_slots, block_size, block_bytes)
        _init_header(arrays, num_slots, block_size, block_bytes, fingerprint)
        return cls(arrays, num_slots, None, None, None)

    @classmethod
    def attach(cls, name: str, num_slots: int, block_size: int, block_bytes: int, fingerprint: int) -> HostSegment:
        """Open the node-wide segment ``name``, creating it with ``num_slots`` slots if it does
        not exist yet; an existing one keeps its size but must match this layout."""
        path = segment_path(name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                existing = _read_header(fd)
                if existing is None or existing["ready"] != 1:  # new, or its creator died initialising it
                    arrays, mm, num_slots = _create(fd, path, num_slots, block_size, block_bytes, fingerprint)
                else:
                    _check_header(existing, path, block_size, block_bytes, fingerprint)
                    num_slots = int(existing["num_slots"])
                    _, _, total = _layout(num_slots, block_size, block_bytes)
                    mm = mmap.mmap(fd, total)
                    arrays = _views(mm, num_slots, block_size, block_bytes)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        except BaseException:
            os.close(fd)
            raise
        return cls(arrays, num_slots, fd, mm, name)

    @contextlib.contextmanager
    def locked(self) -> Iterator[SlotArrays]:
        """The slot table, held exclusively (threads of this process and, when shared, every
        process of the node)."""
        with self._thread_lock:
            if self._fd is None:
                yield self.arrays
                return
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                yield self.arrays
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        """Unmap a shared segment (it stays on the node for the other workers)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        os.close(fd)
        # The numpy views keep the mmap alive until they go; closing it under them would crash.


def remove_segment(name: str) -> bool:
    """Delete the node-wide segment ``name`` (workers that mapped it keep their mapping)."""
    try:
        os.unlink(segment_path(name))
    except FileNotFoundError:
        return False
    return True


def _init_header(arrays: SlotArrays, num_slots: int, block_size: int, block_bytes: int, fingerprint: int) -> None:
    h = arrays.header
    h["magic"], h["version"], h["num_slots"] = MAGIC, LAYOUT_VERSION, num_slots
    h["block_bytes"], h["block_size"], h["fingerprint"] = block_bytes, block_size, fingerprint
    h["tick"], h["next_version"] = 1, 1
    arrays.state[:] = FREE
    h["ready"] = 1  # last: a creator killed before this line leaves a segment the next one rebuilds


def _read_header(fd: int) -> np.void | None:
    if os.fstat(fd).st_size < _HEADER_BYTES:
        return None
    raw = os.pread(fd, HEADER.itemsize, 0)
    header: np.void = np.frombuffer(raw, dtype=HEADER)[0]
    return header


def _create(
    fd: int, path: str, num_slots: int, block_size: int, block_bytes: int, fingerprint: int
) -> tuple[SlotArrays, mmap.mmap, int]:
    if num_slots < 1:
        raise SegmentError(f"node-wide host tier {path} does not exist yet and this worker gives it no size")
    _, _, total = _layout(num_slots, block_size, block_bytes)
    os.ftruncate(fd, 0)
    try:
        os.posix_fallocate(fd, 0, total)
    except OSError as exc:
        os.ftruncate(fd, 0)
        raise SegmentError(f"cannot reserve {total / 2**30:.2f} GiB for the host tier at {path}: {exc}") from exc
    mm = mmap.mmap(fd, total)
    arrays = _views(mm, num_slots, block_size, block_bytes)
    _init_header(arrays, num_slots, block_size, block_bytes, fingerprint)
    return arrays, mm, num_slots


def _check_header(header: np.void, path: str, block_size: int, block_bytes: int, fingerprint: int) -> None:
    if int(header["magic"]) != MAGIC or int(header["version"]) != LAYOUT_VERSION:
        raise SegmentError(f"{path} is not a Tandem host tier of layout version {LAYOUT_VERSION}")
    if (int(header["block_size"]), int(header["block_bytes"]), int(header["fingerprint"])) != (
        block_size,
        block_bytes,
        fingerprint,
    ):
        raise SegmentError(
            f"{path} holds KV blocks of another model, dtype or block size; "
            "give this worker another --kv-host-cache-shared name"
        )
