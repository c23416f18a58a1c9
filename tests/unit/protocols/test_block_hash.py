"""The block-hashing contract (DESIGN.md §4): definition, chaining, salts, and the C loop agreeing
with the Python loop on every input."""

from __future__ import annotations

import random

import numpy as np
import pytest
import xxhash

from tandem.kernels import block_hash as hashing
from tandem.kernels.block_hash import block_hashes
from tandem.protocols.block_hash import BLOCK_HASH_SEED, chain_block_hash, local_block_hash, seed_for_salt


@pytest.fixture
def python_only(monkeypatch):
    """Force the pure-Python loop for the duration of a test."""
    monkeypatch.setattr(hashing, "_native_fn", None)
    monkeypatch.setattr(hashing, "_native_tried", True)


def _by_definition(tokens: list[int], block_size: int, seed: int = BLOCK_HASH_SEED) -> list[int]:
    out, parent = [], None
    for i in range(len(tokens) // block_size):
        data = b"".join(t.to_bytes(4, "little") for t in tokens[i * block_size : (i + 1) * block_size])
        local = xxhash.xxh3_64_intdigest(data, seed=seed)
        parent = (
            local
            if parent is None
            else xxhash.xxh3_64_intdigest(parent.to_bytes(8, "little") + local.to_bytes(8, "little"), seed=seed)
        )
        out.append(parent)
    return out


def test_native_kernel_builds_here():
    # The setup script installs gcc and libxxhash0, so CI exercises the C path.
    assert hashing.native_hashing()


@pytest.mark.parametrize("block_size", [1, 4, 16, 64])
def test_block_hashes_follow_the_contract(block_size):
    rng = random.Random(block_size)
    tokens = [rng.randrange(2**32) for _ in range(block_size * 9 + block_size // 2)]
    assert block_hashes(tokens, block_size) == _by_definition(tokens, block_size)


def test_python_loop_follows_the_contract(python_only):
    rng = random.Random(1)
    tokens = [rng.randrange(200_000) for _ in range(333)]
    assert hashing._native_fn is None
    assert block_hashes(tokens, 16) == _by_definition(tokens, 16)


def test_native_and_python_agree_on_random_inputs(monkeypatch):
    assert hashing.native_hashing()
    native = hashing._native_fn
    rng = random.Random(7)
    for trial in range(200):
        block_size = rng.choice([1, 2, 16, 32])
        tokens = [rng.randrange(2**32) for _ in range(rng.randrange(0, 300))]
        seed = rng.choice([BLOCK_HASH_SEED, seed_for_salt(f"tenant-{trial}"), 0, 2**64 - 1])
        parent = rng.choice([None, 0, rng.randrange(2**64)])
        monkeypatch.setattr(hashing, "_native_fn", native)
        fast = block_hashes(tokens, block_size, seed, parent)
        monkeypatch.setattr(hashing, "_native_fn", None)
        slow = block_hashes(tokens, block_size, seed, parent)
        assert fast == slow, (trial, block_size, len(tokens), seed, parent)


def test_chaining_continues_where_the_prefix_stopped():
    rng = random.Random(3)
    tokens = [rng.randrange(50_000) for _ in range(160)]
    whole = block_hashes(tokens, 16)
    head = block_hashes(tokens[:64], 16)
    tail = block_hashes(tokens[64:], 16, parent_hash=head[-1])
    assert head + tail == whole
    assert whole[0] == local_block_hash(tokens[:16])
    assert whole[1] == chain_block_hash(whole[0], local_block_hash(tokens[16:32]))


def test_numpy_and_list_inputs_hash_alike():
    tokens = list(range(100, 164))
    assert block_hashes(np.array(tokens, dtype=np.int64), 16) == block_hashes(tokens, 16)


def test_partial_blocks_are_not_hashed_and_salts_separate_tenants():
    tokens = list(range(40))
    assert len(block_hashes(tokens, 16)) == 2
    assert block_hashes(tokens[:15], 16) == []
    salted = block_hashes(tokens, 16, seed_for_salt("a"))
    assert salted != block_hashes(tokens, 16) and salted != block_hashes(tokens, 16, seed_for_salt("b"))
    assert seed_for_salt(None) == seed_for_salt("") == BLOCK_HASH_SEED


def test_token_ids_outside_uint32_are_rejected():
    with pytest.raises((OverflowError, ValueError)):
        block_hashes([-1] * 16, 16)
