"""Tests for tandem.router.kv.indexer: exact matches, removals, clears, a model-based property."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.vllm_samples import VLLM_032_BATCH

from tandem.protocols.block_hash import block_hashes, seed_for_salt
from tandem.protocols.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, decode_batch, make_batch
from tandem.router.kv.indexer import KvIndexer

BS = 4


def toks(start: int, n_blocks: int) -> list[int]:
    return list(range(start, start + n_blocks * BS))


def stored(engine_hashes: list[int], tokens: list[int], parent: int | None = None) -> BlockStored:
    return BlockStored(block_hashes=engine_hashes, parent_block_hash=parent, token_ids=tokens, block_size=BS)


# A shared 2-block prefix, then two divergent continuations.
PREFIX = toks(0, 2)
TAIL_A = toks(100, 2)
TAIL_B = toks(200, 1)


@pytest.fixture
def idx() -> KvIndexer:
    """w1 holds PREFIX+TAIL_A (stored over two chained events), w2 holds PREFIX+TAIL_B."""
    idx = KvIndexer(BS)
    idx.apply("w1", stored([11, 12], PREFIX))
    idx.apply("w1", stored([13, 14], TAIL_A, parent=12))
    idx.apply_batch("w2", make_batch([stored([21, 22, 23], PREFIX + TAIL_B)]))
    return idx


def test_sequence_hashes_match_the_contract():
    idx = KvIndexer(BS)
    tokens = toks(0, 3) + [7, 7]  # trailing partial block is not hashed
    assert idx.sequence_hashes(tokens) == block_hashes(tokens, BS)
    assert len(idx.sequence_hashes(tokens)) == 3


def test_exact_matches_shared_and_divergent_prefixes(idx: KvIndexer):
    q_a = idx.sequence_hashes(PREFIX + TAIL_A + toks(900, 1))
    q_b = idx.sequence_hashes(PREFIX + TAIL_B)
    q_prefix = idx.sequence_hashes(PREFIX)
    assert idx.find_matches(q_a) == {"w1": 4, "w2": 2}
    assert idx.find_matches(q_b) == {"w1": 2, "w2": 3}
    assert idx.find_matches(q_prefix) == {"w1": 2, "w2": 2}
    assert idx.find_matches(idx.sequence_hashes(toks(500, 3))) == {}
    assert idx.find_matches([]) == {}
    # Same tail tokens after a different prefix hash differently: no match past block 0.
    assert idx.find_matches(idx.sequence_hashes(toks(0, 1) + TAIL_A)) == {"w1": 1, "w2": 1}
    assert idx.blocks_of("w1") == 4 and idx.blocks_of("w2") == 3 and idx.blocks_of("nope") == 0
    assert idx.workers() == {"w1", "w2"}
    assert idx.num_blocks() == 5
    assert idx.stats.events_applied == 3 and idx.stats.blocks_stored == 7


def test_parent_chaining_uses_router_hashes_not_engine_hashes():
    # Engine hashes are arbitrary ids; the router hashes token_ids from the parent's seq hash.
    idx = KvIndexer(BS)
    tokens = toks(0, 3)
    idx.apply("w", stored([999], tokens[:BS]))
    idx.apply("w", stored([5], tokens[BS : 2 * BS], parent=999))
    idx.apply("w", stored([77], tokens[2 * BS :], parent=5))
    assert idx.find_matches(block_hashes(tokens, BS)) == {"w": 3}


def test_removing_a_middle_block_stops_matches_there(idx: KvIndexer):
    q_a = idx.sequence_hashes(PREFIX + TAIL_A)
    idx.apply("w1", BlockRemoved(block_hashes=[12]))
    assert idx.find_matches(q_a) == {"w1": 1, "w2": 2}
    assert idx.blocks_of("w1") == 3
    # A later block of w1 stays indexed and removable by its engine hash.
    idx.apply("w1", BlockRemoved(block_hashes=[14, 12, 4242]))
    assert idx.blocks_of("w1") == 2
    assert idx.stats.blocks_removed == 2
    assert idx.stats.unknown_removals == 2  # 12 again, and 4242
    # Another worker's engine hash is not this worker's.
    idx.apply("w2", BlockRemoved(block_hashes=[11]))
    assert idx.stats.unknown_removals == 3
    assert idx.find_matches(idx.sequence_hashes(PREFIX)) == {"w1": 1, "w2": 2}


def test_all_blocks_cleared_drops_only_that_worker(idx: KvIndexer):
    idx.apply("w1", AllBlocksCleared())
    assert idx.blocks_of("w1") == 0
    assert "w1" in idx.workers()
    assert idx.find_matches(idx.sequence_hashes(PREFIX + TAIL_A)) == {"w2": 2}
    # After a clear, old engine hashes are unknown parents.
    idx.apply("w1", stored([15], TAIL_A[:BS], parent=12))
    assert idx.stats.unknown_parents == 1
    assert idx.blocks_of("w1") == 0


def test_remove_worker(idx: KvIndexer):
    idx.remove_worker("w2")
    idx.remove_worker("never-seen")
    assert idx.workers() == {"w1"}
    assert idx.find_matches(idx.sequence_hashes(PREFIX + TAIL_B)) == {"w1": 2}
    idx.remove_worker("w1")
    assert idx.workers() == set() and idx.num_blocks() == 0


def test_unknown_parent_events_are_skipped_and_counted():
    idx = KvIndexer(BS)
    idx.apply("w", stored([1, 2], toks(0, 2), parent=123))
    assert idx.stats.unknown_parents == 1
    assert idx.blocks_of("w") == 0
    assert idx.find_matches(block_hashes(toks(0, 2), BS)) == {}
    assert idx.stats.events_applied == 0


def test_malformed_mismatched_and_unknown_medium_events_are_skipped():
    idx = KvIndexer(BS)
    idx.apply("w", stored([1, 2], toks(0, 1)))  # too few tokens for two blocks
    idx.apply("w", BlockStored([1], None, list(range(8)), block_size=8))  # other block size
    idx.apply("w", BlockStored([1], None, toks(0, 1), BS, medium="TAPE"))  # names no tier
    idx.apply("w", BlockRemoved([1], medium="S3"))
    assert idx.stats.skipped_events == 4
    assert idx.blocks_of("w") == 0
    with pytest.raises(TypeError):
        idx.apply("w", object())  # type: ignore[arg-type]


def test_two_engine_hashes_for_one_router_block_are_ref_counted():
    # An engine that salts its own hashes reports the same tokens under two ids.
    idx = KvIndexer(BS)
    idx.apply("w", stored([1], toks(0, 1)))
    idx.apply("w", stored([2], toks(0, 1)))
    idx.apply("w", stored([1], toks(0, 1)))  # a repeated report is idempotent
    q = block_hashes(toks(0, 1), BS)
    idx.apply("w", BlockRemoved([1]))
    assert idx.find_matches(q) == {"w": 1}
    idx.apply("w", BlockRemoved([2]))
    assert idx.find_matches(q) == {}


def test_cache_salt_changes_hashes(idx: KvIndexer):
    tokens = PREFIX + TAIL_A
    salted = idx.sequence_hashes(tokens, cache_salt="tenant-a")
    assert salted == block_hashes(tokens, BS, seed_for_salt("tenant-a"))
    assert salted != idx.sequence_hashes(tokens)
    assert salted != idx.sequence_hashes(tokens, cache_salt="tenant-b")
    assert idx.sequence_hashes(tokens, cache_salt="") == idx.sequence_hashes(tokens)
    assert idx.find_matches(salted) == {}


# ---- property: agreement with a brute-force model --------------------------------------------


class _SimEngine:
    """A tiny engine: prefix cache of token blocks under its own engine hash ids, emitting events.

    Engine hashes are fresh integers per stored block (opaque to the router); the model of what
    the worker holds is the set of router seq hashes of its cached blocks.
    """

    def __init__(self, base_id: int) -> None:
        self._next_id = base_id
        self.cached: dict[int, int] = {}  # router seq hash -> engine hash id
        self.seq_of: dict[int, int] = {}  # engine hash id -> router seq hash

    def store(self, prompt: list[int]) -> list[BlockStored]:
        """Cache ``prompt``'s full blocks; report the new ones as chained runs."""
        seqs = block_hashes(prompt, BS)
        events: list[BlockStored] = []
        run_ids: list[int] = []
        run_start = 0
        parent: int | None = None
        run_parent: int | None = None
        for i, seq in enumerate(seqs):
            if seq in self.cached:
                parent = self.cached[seq]
                continue
            if not run_ids:
                run_start = i
                run_parent = parent
            self._next_id += 1
            self.cached[seq] = self._next_id
            self.seq_of[self._next_id] = seq
            run_ids.append(self._next_id)
            parent = self._next_id
            if i == len(seqs) - 1 or seqs[i + 1] in self.cached:
                events.append(stored(run_ids, prompt[run_start * BS : (i + 1) * BS], run_parent))
                run_ids = []
        return events

    def remove(self, picks: list[int]) -> list[BlockRemoved]:
        ids = sorted(self.seq_of)
        if not ids:
            return []
        gone = sorted({ids[p % len(ids)] for p in picks})
        for eid in gone:
            del self.cached[self.seq_of.pop(eid)]
        return [BlockRemoved(block_hashes=gone)]

    def clear(self) -> list[AllBlocksCleared]:
        self.cached.clear()
        self.seq_of.clear()
        return [AllBlocksCleared()]


# Prompts drawn from a small vocabulary of blocks so prefixes are often shared.
_block = st.sampled_from([toks(s, 1) for s in (0, 10, 20, 30)])
_prompt = st.lists(_block, min_size=1, max_size=5).map(lambda bs: [t for b in bs for t in b])
_op = st.one_of(
    st.tuples(st.just("store"), st.integers(0, 2), _prompt),
    st.tuples(st.just("remove"), st.integers(0, 2), st.lists(st.integers(0, 50), min_size=1, max_size=3)),
    st.tuples(st.just("clear"), st.integers(0, 2), st.none()),
)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(_op, max_size=30), queries=st.lists(_prompt, min_size=1, max_size=5))
def test_indexer_agrees_with_brute_force_model(ops, queries):
    # w0 and w2 draw engine ids from the same range: engine ids must be kept per worker.
    engines = [_SimEngine(base_id=b) for b in (1000, 5000, 1000)]
    idx = KvIndexer(BS)
    for kind, w, arg in ops:
        engine = engines[w]
        if kind == "store":
            events = engine.store(arg)
        elif kind == "remove":
            events = engine.remove(arg)
        else:
            events = engine.clear()
        for event in events:
            idx.apply(f"w{w}", event)

    assert idx.stats.unknown_parents == 0
    assert idx.stats.unknown_removals == 0
    for w, engine in enumerate(engines):
        assert idx.blocks_of(f"w{w}") == len(engine.cached)
    for query in queries:
        seqs = idx.sequence_hashes(query)
        expected = {}
        for w, engine in enumerate(engines):
            n = 0
            while n < len(seqs) and seqs[n] in engine.cached:
                n += 1
            if n:
                expected[f"w{w}"] = n
        assert idx.find_matches(seqs) == expected


def test_the_router_indexes_vllm_events_under_its_own_sequence_hashes() -> None:
    indexer = KvIndexer(block_size=16)
    indexer.apply_batch("vllm-0", decode_batch(VLLM_032_BATCH).events[:1])
    own = block_hashes(list(range(32)), 16)
    assert indexer.find_matches(own) == {"vllm-0": 2}
