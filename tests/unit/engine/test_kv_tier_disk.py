"""G3, the disk tier: the block file format and DiskPool."""

from __future__ import annotations

import builtins
import errno
import logging
import os

import pytest
import torch

from tandem.engine.kv_tiers import disk_format, disk_pool
from tandem.engine.kv_tiers.block_meta import BlockMeta
from tandem.engine.kv_tiers.disk_format import (
    HEADER_BYTES,
    CorruptBlockError,
    decode_block,
    decode_header,
    decode_meta,
    encode_block,
    file_name,
    file_size,
)
from tandem.engine.kv_tiers.disk_pool import DiskPool, DiskTierError
from tandem.kernels.block_hash import block_hashes

BS = 4
SHAPE = [2, 2, BS, 1, 8]
DTYPE = torch.float32
PAYLOAD_LEN = 2 * 2 * BS * 1 * 8 * 4
FP = 0xABCDEF
SEED = 0


def chain(n: int, start: int = 0, seed: int = SEED) -> list[BlockMeta]:
    """``n`` chained blocks of the tokens start, start+1, ... with their real sequence hashes."""
    tokens = list(range(start, start + n * BS))
    hashes = block_hashes(tokens, BS, seed)
    return [
        BlockMeta(h, hashes[i - 1] if i else None, seed, tuple(tokens[i * BS : (i + 1) * BS]))
        for i, h in enumerate(hashes)
    ]


def block(value: float) -> torch.Tensor:
    return torch.full(SHAPE, float(value), dtype=DTYPE)


def payload_bytes(value: float) -> bytes:
    return block(value).numpy().tobytes()


def make_pool(directory, capacity: int = 8, **kw) -> DiskPool:
    return DiskPool(str(directory), capacity, BS, SHAPE, DTYPE, FP, **kw)


@pytest.fixture
def pools():
    """Closes every pool a test makes (their directory locks)."""
    made: list[DiskPool] = []
    yield made
    for pool in made:
        pool.close()


def new_pool(pools, directory, capacity: int = 8, **kw) -> DiskPool:
    pool = make_pool(directory, capacity, **kw)
    pools.append(pool)
    return pool


def files_in(pool: DiskPool) -> set[str]:
    return {name for name in os.listdir(pool.directory) if name != ".lock"}


# ---- the file format ------------------------------------------------------------------------------


def test_a_block_round_trips_through_its_file():
    a, b = chain(2, seed=7)
    b.frequency = 3
    raw = encode_block(b, BS, FP, payload_bytes(1.5))
    assert len(raw) == file_size(BS, PAYLOAD_LEN) == HEADER_BYTES + 4 * BS + PAYLOAD_LEN
    meta, data = decode_block(raw, FP, BS, PAYLOAD_LEN)
    assert meta == BlockMeta(b.block_hash, a.block_hash, 7, b.token_ids, 3)
    assert data == payload_bytes(1.5)
    root, _ = decode_block(encode_block(a, BS, FP, payload_bytes(0)), FP, BS, PAYLOAD_LEN)
    assert root.parent_hash is None and root.block_hash == a.block_hash
    assert decode_meta(raw, BS) == meta  # header + tokens alone
    assert file_name(b.block_hash) == f"{b.block_hash:016x}.kvb"


@pytest.mark.parametrize("region", ["header", "tokens", "payload"])
def test_every_single_byte_corruption_is_rejected(region):
    a, b = chain(2)
    raw = encode_block(b, BS, FP, payload_bytes(2.0))
    start, end = {
        "header": (0, HEADER_BYTES),
        "tokens": (HEADER_BYTES, HEADER_BYTES + 4 * BS),
        "payload": (HEADER_BYTES + 4 * BS, len(raw)),
    }[region]
    accepted = []
    for at in range(start, end):
        bad = bytearray(raw)
        bad[at] ^= 0xFF
        try:
            decode_block(bytes(bad), FP, BS, PAYLOAD_LEN)
        except CorruptBlockError:
            continue
        accepted.append(at)
    assert accepted == []


@pytest.mark.parametrize("keep", [0, 10, HEADER_BYTES - 1, HEADER_BYTES, HEADER_BYTES + 4 * BS, -1])
def test_a_truncated_file_is_rejected(keep):
    raw = encode_block(chain(1)[0], BS, FP, payload_bytes(1.0))
    with pytest.raises(CorruptBlockError):
        decode_block(raw[:keep], FP, BS, PAYLOAD_LEN)


def test_a_file_with_a_trailing_byte_is_rejected():
    raw = encode_block(chain(1)[0], BS, FP, payload_bytes(1.0))
    with pytest.raises(CorruptBlockError, match="bytes, expected"):
        decode_block(raw + b"\0", FP, BS, PAYLOAD_LEN)


def test_a_broken_hash_chain_is_rejected_even_with_a_valid_checksum():
    a, b, c = chain(3)
    wrong_hash = BlockMeta(c.block_hash, b.parent_hash, SEED, b.token_ids)  # b's tokens under c's hash
    wrong_parent = BlockMeta(b.block_hash, c.block_hash, SEED, b.token_ids)
    wrong_seed = BlockMeta(b.block_hash, a.block_hash, SEED + 1, b.token_ids)
    for meta in (wrong_hash, wrong_parent, wrong_seed):
        raw = encode_block(meta, BS, FP, payload_bytes(1.0))
        assert decode_header(raw).meta.block_hash == meta.block_hash  # the file itself is well formed
        with pytest.raises(CorruptBlockError, match="hash chain broken"):
            decode_block(raw, FP, BS, PAYLOAD_LEN)


def test_a_block_of_another_layout_is_rejected():
    raw = encode_block(chain(1)[0], BS, FP, payload_bytes(1.0))
    with pytest.raises(CorruptBlockError, match="another model"):
        decode_block(raw, FP + 1, BS, PAYLOAD_LEN)
    with pytest.raises(CorruptBlockError, match="another model"):
        decode_block(raw, FP, BS, PAYLOAD_LEN * 2)


def test_encoding_a_block_of_the_wrong_size_is_refused():
    meta = BlockMeta(1, None, 0, (1, 2, 3))
    with pytest.raises(ValueError, match="holds 4 tokens, got 3"):
        encode_block(meta, BS, FP, payload_bytes(1.0))


# ---- the pool -------------------------------------------------------------------------------------


def test_eviction_deletes_the_files_of_the_least_recently_used_blocks(tmp_path, pools):
    pool = new_pool(pools, tmp_path, capacity=3)
    a, b, c, d, e = chain(5)
    for i, meta in enumerate([a, b, c]):
        assert pool.write(meta, block(i)) == (True, [])
    pool.read([a.block_hash])  # a is now the most recently used
    assert pool.write(b, block(9)) == (False, [])  # already there: a use, nothing written
    assert pool.write(d, block(3)) == (True, [c.block_hash])
    assert pool.write(e, block(4)) == (True, [a.block_hash])
    assert files_in(pool) == {file_name(h.block_hash) for h in (b, d, e)}
    assert [m.block_hash for m in pool.blocks()] == [b.block_hash, d.block_hash, e.block_hash]
    assert len(pool) == 3 and pool.match([a.block_hash]) == 0


def test_read_returns_the_leading_run_with_the_written_bytes(tmp_path, pools):
    pool = new_pool(pools, tmp_path)
    a, b, c = chain(3)
    pool.write(a, block(1))
    pool.write(c, block(3))
    metas, data, dropped = pool.read([a.block_hash, b.block_hash, c.block_hash])
    assert [m.block_hash for m in metas] == [a.block_hash] and dropped == []
    assert torch.equal(data, block(1).unsqueeze(0))
    assert metas[0].frequency == 2 and metas[0].token_ids == a.token_ids
    assert pool.match([a.block_hash, b.block_hash, c.block_hash]) == 1
    assert pool.counters.bytes_read == file_size(BS, PAYLOAD_LEN)
    assert pool.counters.bytes_written == 2 * file_size(BS, PAYLOAD_LEN)


def test_blocks_survive_a_restart_and_the_scan_puts_parents_first(tmp_path, pools):
    first = make_pool(tmp_path)
    a, b, c = chain(3)
    for i, meta in enumerate([c, b, a]):  # children written before their parents
        first.write(meta, block(i))
    for age, meta in enumerate([c, b, a]):  # and older (the scan orders by mtime first)
        os.utime(first._path(meta.block_hash), (1_000_000 + age, 1_000_000 + age))
    first.close()
    pool = new_pool(pools, tmp_path)
    found = pool.scan()
    assert [m.block_hash for m in found] == [a.block_hash, b.block_hash, c.block_hash]
    assert [(m.parent_hash, m.token_ids) for m in found] == [
        (None, a.token_ids),
        (a.block_hash, b.token_ids),
        (b.block_hash, c.token_ids),
    ]
    assert [m.block_hash for m in pool.blocks()] == [c.block_hash, b.block_hash, a.block_hash]  # oldest first
    metas, data, dropped = pool.read([a.block_hash, b.block_hash, c.block_hash])
    assert len(metas) == 3 and dropped == []
    assert torch.equal(data, torch.stack([block(2), block(1), block(0)]))


def test_the_scan_removes_interrupted_writes_and_garbage(tmp_path, pools):
    first = make_pool(tmp_path)
    a, b = chain(2)
    first.write(a, block(1))
    directory = first.directory
    first.close()
    leftover = os.path.join(directory, f"{file_name(b.block_hash)}.tmp-123-456")
    with open(leftover, "wb") as f:
        f.write(encode_block(b, BS, FP, payload_bytes(2.0))[:50])
    garbage = os.path.join(directory, "0123456789abcdef.kvb")
    with open(garbage, "wb") as f:
        f.write(b"not a block")
    misnamed = os.path.join(directory, "00000000000000ff.kvb")  # a valid block under another name
    with open(misnamed, "wb") as f:
        f.write(encode_block(b, BS, FP, payload_bytes(2.0)))
    pool = new_pool(pools, tmp_path)
    assert [m.block_hash for m in pool.scan()] == [a.block_hash]
    assert files_in(pool) == {file_name(a.block_hash)}
    assert pool.counters.corrupt_blocks == 2


def test_the_scan_deletes_the_oldest_blocks_beyond_the_capacity(tmp_path, pools):
    first = make_pool(tmp_path, capacity=4)
    blocks = chain(4)
    for i, meta in enumerate(blocks):
        first.write(meta, block(i))
        os.utime(first._path(meta.block_hash), (1_000_000 + i, 1_000_000 + i))
    first.close()
    pool = new_pool(pools, tmp_path, capacity=2)
    assert [m.block_hash for m in pool.scan()] == [m.block_hash for m in blocks[2:]]
    assert files_in(pool) == {file_name(m.block_hash) for m in blocks[2:]}


def test_a_corrupt_file_ends_the_read_is_reported_counted_and_deleted(tmp_path, pools, caplog):
    pool = new_pool(pools, tmp_path)
    a, b, c = chain(3)
    for i, meta in enumerate([a, b, c]):
        pool.write(meta, block(i))
    path = pool._path(b.block_hash)
    with open(path, "r+b") as f:
        f.seek(HEADER_BYTES + 4 * BS + 17)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))
    with caplog.at_level(logging.WARNING, logger=disk_pool.__name__):
        metas, data, dropped = pool.read([a.block_hash, b.block_hash, c.block_hash])
    assert [m.block_hash for m in metas] == [a.block_hash] and torch.equal(data, block(0).unsqueeze(0))
    assert dropped == [b.block_hash]
    assert pool.counters.corrupt_blocks == 1 and pool.counters.missing_blocks == 0
    assert not os.path.exists(path)
    assert pool.match([b.block_hash]) == 0 and pool.contains(c.block_hash)
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert f"{b.block_hash:016x}" in caplog.records[0].getMessage()


def test_a_deleted_file_is_a_miss_and_is_counted_missing(tmp_path, pools):
    pool = new_pool(pools, tmp_path)
    a, b = chain(2)
    pool.write(a, block(0))
    pool.write(b, block(1))
    os.unlink(pool._path(a.block_hash))
    metas, data, dropped = pool.read([a.block_hash, b.block_hash])
    assert metas == [] and data.shape == (0, *SHAPE) and dropped == [a.block_hash]
    assert pool.counters.missing_blocks == 1 and pool.counters.corrupt_blocks == 0
    assert len(pool) == 1 and not pool.contains(a.block_hash)


def test_a_second_pool_on_the_same_directory_is_refused(tmp_path, pools):
    first = make_pool(tmp_path)
    with pytest.raises(DiskTierError, match="another engine uses the KV disk tier"):
        make_pool(tmp_path)
    first.close()
    new_pool(pools, tmp_path)  # free again once the first is closed


def test_a_pool_on_a_path_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(DiskTierError, match="cannot use"):
        make_pool(tmp_path / "file")


def _failing_writes(err: int):
    def fake_open(path, mode="r", *args, **kwargs):
        if "w" in mode:
            raise OSError(err, os.strerror(err), path)
        return builtins.open(path, mode, *args, **kwargs)

    return fake_open


@pytest.mark.parametrize(
    ("err", "reason"),
    [(errno.ENOSPC, "the disk is full"), (errno.EACCES, "the directory is not writable")],
    ids=["full", "unwritable"],
)
def test_a_failed_write_is_logged_once_pauses_writes_and_reads_go_on(tmp_path, pools, monkeypatch, caplog, err, reason):
    pool = new_pool(pools, tmp_path)
    a, b, c = chain(3)
    pool.write(a, block(1))
    monkeypatch.setattr(disk_pool, "open", _failing_writes(err), raising=False)
    with caplog.at_level(logging.ERROR, logger=disk_pool.__name__):
        assert pool.write(b, block(2)) == (False, [])
        assert pool.write(c, block(3)) == (False, [])  # paused: not even tried
    assert pool.counters.write_errors == 1
    assert pool.writes_paused
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and reason in errors[0].getMessage()
    assert files_in(pool) == {file_name(a.block_hash)}  # no temporary file left behind
    assert len(pool) == 1 and not pool.contains(b.block_hash)
    metas, data, dropped = pool.read([a.block_hash])
    assert [m.block_hash for m in metas] == [a.block_hash] and torch.equal(data, block(1).unsqueeze(0))


def test_writes_resume_after_the_pause(tmp_path, pools, monkeypatch):
    pool = new_pool(pools, tmp_path, retry_after_s=0.0)
    a, b = chain(2)
    monkeypatch.setattr(disk_pool, "open", _failing_writes(errno.ENOSPC), raising=False)
    assert pool.write(a, block(1)) == (False, [])
    monkeypatch.undo()
    assert not pool.writes_paused
    assert pool.write(a, block(1)) == (True, [])
    assert pool.counters.write_errors == 1


def test_clear_deletes_every_block_file(tmp_path, pools):
    pool = new_pool(pools, tmp_path)
    blocks = chain(3)
    for i, meta in enumerate(blocks):
        pool.write(meta, block(i))
    assert pool.clear() == [m.block_hash for m in blocks]
    assert files_in(pool) == set() and len(pool) == 0


def test_the_directory_is_named_after_the_layout_fingerprint(tmp_path, pools):
    pool = new_pool(pools, tmp_path)
    assert pool.directory == os.path.join(str(tmp_path), f"{FP:016x}")
    assert disk_format.SUFFIX == ".kvb"
