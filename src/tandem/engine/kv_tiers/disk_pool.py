"""G3: KV blocks on local disk, one file per block (``disk_format``), least recently used first out.

The pool owns ``<dir>/<layout fingerprint>/`` alone (an flock on its ``.lock`` file refuses a
second engine). At start it scans the headers found there, drops leftovers of interrupted
writes, and serves those blocks again: the tier survives a restart. A write goes to a temporary
file renamed into place, so a reader never sees half a block. An unreadable, corrupt or missing
file is a miss (its entry is dropped). A failed write (full disk, unwritable directory) is
logged once, counted, and pauses writing for ``retry_after_s``; reads go on.

Thread-safe: the engine thread looks blocks up while the tier's I/O threads read and write.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

from tandem.engine.kv_tiers import disk_format
from tandem.engine.kv_tiers.block_meta import BlockMeta, parents_first
from tandem.engine.kv_tiers.disk_format import CorruptBlockError

logger = logging.getLogger(__name__)


class DiskTierError(RuntimeError):
    """The disk tier cannot be used at all (e.g. its directory is taken by another engine)."""


@dataclass
class DiskCounters:
    write_errors: int = 0
    corrupt_blocks: int = 0
    missing_blocks: int = 0
    bytes_written: int = 0
    bytes_read: int = 0


class DiskPool:
    def __init__(
        self,
        directory: str,
        capacity_blocks: int,
        block_size: int,
        block_shape: list[int],
        dtype: torch.dtype,
        fingerprint: int,
        retry_after_s: float = 60.0,
    ) -> None:
        self.block_size = block_size
        self.block_shape = list(block_shape)
        self.dtype = dtype
        self.fingerprint = fingerprint
        self.payload_len = torch.Size(block_shape).numel() * torch.tensor([], dtype=dtype).element_size()
        self.capacity_blocks = max(0, capacity_blocks)
        self.retry_after_s = retry_after_s
        self.directory = os.path.join(directory, f"{fingerprint:016x}")
        self.counters = DiskCounters()
        self._lock = threading.Lock()
        self._index: OrderedDict[int, BlockMeta] = OrderedDict()  # least recently used first
        self._writes_paused_until = 0.0
        self._lock_fd = self._take_directory()

    # ---- start ----------------------------------------------------------------------------------

    def _take_directory(self) -> int:
        try:
            os.makedirs(self.directory, exist_ok=True)
            fd = os.open(os.path.join(self.directory, ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise DiskTierError(f"cannot use {self.directory} for the KV disk tier: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DiskTierError(
                f"another engine uses the KV disk tier at {self.directory}; give each worker its own --kv-disk-cache-dir"
            ) from None
        return fd

    def scan(self) -> list[BlockMeta]:
        """Index the block files already in the directory (oldest first) and return them,
        parents before children where both are here. Files beyond the capacity are deleted."""
        found: list[tuple[float, BlockMeta]] = []
        for entry in os.scandir(self.directory):
            if ".tmp-" in entry.name:
                _unlink(entry.path)  # a write interrupted by a crash
                continue
            if not entry.name.endswith(disk_format.SUFFIX):
                continue
            try:
                with open(entry.path, "rb") as f:
                    raw = f.read(disk_format.HEADER_BYTES + 4 * self.block_size)
                header = disk_format.decode_header_and_tokens(raw, self.block_size)
                stat = entry.stat()
            except (OSError, CorruptBlockError):
                _unlink(entry.path)
                self.counters.corrupt_blocks += 1
                continue
            meta = header.meta
            if (
                header.fingerprint != self.fingerprint
                or entry.name != disk_format.file_name(meta.block_hash)
                or stat.st_size != disk_format.file_size(self.block_size, self.payload_len)
            ):
                _unlink(entry.path)
                self.counters.corrupt_blocks += 1
                continue
            found.append((stat.st_mtime, meta))
        found.sort(key=lambda item: item[0])
        excess = max(0, len(found) - self.capacity_blocks)
        for _, meta in found[:excess]:  # the oldest go
            _unlink(self._path(meta.block_hash))
        found = found[excess:]
        with self._lock:
            self._index = OrderedDict((meta.block_hash, meta) for _, meta in found)
        return parents_first([meta for _, meta in found])

    # ---- lookup ---------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._index)

    def contains(self, block_hash: int) -> bool:
        return block_hash in self._index

    def note_use(self, block_hash: int, frequency: int) -> bool:
        """Whether the tier holds the block; if so it counts a use (frequency at least the given
        one, most recently used)."""
        with self._lock:
            known = self._index.get(block_hash)
            if known is None:
                return False
            known.frequency = max(known.frequency, frequency)
            self._index.move_to_end(block_hash)
            return True

    def match(self, hashes: list[int]) -> int:
        """How many leading ``hashes`` this tier holds (files are checked only when read)."""
        with self._lock:
            for count, block_hash in enumerate(hashes):
                if block_hash not in self._index:
                    return count
        return len(hashes)

    # ---- I/O (tier threads) ---------------------------------------------------------------------

    def read(self, hashes: list[int]) -> tuple[list[BlockMeta], torch.Tensor, list[int]]:
        """The leading run of ``hashes`` that reads back intact: metadata, bytes ``[n, *shape]``,
        and the hashes dropped because their file was missing or corrupt."""
        metas: list[BlockMeta] = []
        payloads: list[bytes] = []
        dropped: list[int] = []
        for block_hash in hashes:
            with self._lock:
                if block_hash not in self._index:
                    break
            try:
                with open(self._path(block_hash), "rb") as f:
                    raw = f.read()
                meta, payload = disk_format.decode_block(raw, self.fingerprint, self.block_size, self.payload_len)
                if meta.block_hash != block_hash:
                    raise CorruptBlockError("file holds another block")
            except FileNotFoundError:
                self.counters.missing_blocks += 1
                dropped.append(block_hash)
                self._forget(block_hash)
                break
            except (OSError, CorruptBlockError) as exc:
                logger.warning("KV disk tier: dropping block %016x: %s", block_hash, exc)
                self.counters.corrupt_blocks += 1
                dropped.append(block_hash)
                self._forget(block_hash)
                _unlink(self._path(block_hash))
                break
            with self._lock:
                known = self._index.get(block_hash)
                if known is not None:
                    known.frequency += 1
                    meta.frequency = known.frequency
                    self._index.move_to_end(block_hash)
            self.counters.bytes_read += len(raw)
            metas.append(meta)
            payloads.append(payload)
        if not metas:
            return [], torch.empty(0, *self.block_shape, dtype=self.dtype), dropped
        data = torch.frombuffer(bytearray(b"".join(payloads)), dtype=self.dtype).view(len(metas), *self.block_shape)
        return metas, data, dropped

    def write(self, meta: BlockMeta, data: torch.Tensor) -> tuple[bool, list[int]]:
        """Store one block; returns (whether it was newly written, hashes evicted for room)."""
        with self._lock:
            if meta.block_hash in self._index:
                known = self._index[meta.block_hash]
                known.frequency = max(known.frequency, meta.frequency)
                self._index.move_to_end(meta.block_hash)
                return False, []
            if time.monotonic() < self._writes_paused_until or self.capacity_blocks == 0:
                return False, []
        payload = data.contiguous().view(torch.uint8).numpy().tobytes()
        blob = disk_format.encode_block(meta, self.block_size, self.fingerprint, payload)
        path = self._path(meta.block_hash)
        tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
        try:
            with open(tmp, "wb") as f:
                f.write(blob)
            os.replace(tmp, path)
        except OSError as exc:
            _unlink(tmp)
            self._write_failed(exc)
            return False, []
        self.counters.bytes_written += len(blob)
        evicted: list[int] = []
        with self._lock:
            self._index[meta.block_hash] = BlockMeta(
                meta.block_hash, meta.parent_hash, meta.hash_seed, tuple(meta.token_ids), meta.frequency
            )
            while len(self._index) > self.capacity_blocks:
                old, _ = self._index.popitem(last=False)
                evicted.append(old)
        for old in evicted:
            _unlink(self._path(old))
        return True, evicted

    def _write_failed(self, exc: OSError) -> None:
        self.counters.write_errors += 1
        reason = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up"}.get(
            exc.errno or 0, "the directory is not writable"
        )
        with self._lock:
            paused = time.monotonic() < self._writes_paused_until
            self._writes_paused_until = time.monotonic() + self.retry_after_s
        if not paused:
            logger.error(
                "KV disk tier at %s: %s (%s); not writing to it for %.0fs, serving goes on without it",
                self.directory,
                reason,
                exc,
                self.retry_after_s,
            )

    @property
    def writes_paused(self) -> bool:
        return time.monotonic() < self._writes_paused_until

    def _forget(self, block_hash: int) -> None:
        with self._lock:
            self._index.pop(block_hash, None)

    def clear(self) -> list[int]:
        with self._lock:
            hashes = list(self._index)
            self._index.clear()
        for block_hash in hashes:
            _unlink(self._path(block_hash))
        return hashes

    def blocks(self) -> list[BlockMeta]:
        """Every block indexed, least recently used first."""
        with self._lock:
            return list(self._index.values())

    def close(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def _path(self, block_hash: int) -> str:
        return os.path.join(self.directory, disk_format.file_name(block_hash))


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
