"""Workload generators of `tandem bench`: exact token lengths, determinism, multi-turn history
growth, and trace replay whose shared hash_ids share exactly the right KV blocks."""

from __future__ import annotations

import itertools
import statistics

import pytest

from tandem.bench.workloads.multi_turn import (
    MultiTurnConfig,
    UserSession,
    new_session,
    session_duration_s,
    user_gap_s,
    user_join_interval_s,
)
from tandem.bench.workloads.random_tokens import RandomWorkloadConfig, random_requests
from tandem.bench.workloads.shared_prefix import SharedPrefixConfig, shared_prefix_requests
from tandem.bench.workloads.trace import (
    TraceConfig,
    TraceEntry,
    iter_trace_requests,
    load_trace,
    synthesize_trace,
    trace_requests,
    write_trace,
)
from tandem.protocols.block_hash import block_hashes

HASH_BLOCK = 16


def common_prefix_len(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def in_vocab(tokens: list[int], first: int = 1000, vocab: int = 32000) -> bool:
    return all(first <= t < vocab for t in tokens)


# --- random -------------------------------------------------------------------------------------


def test_random_exact_lengths_without_spread():
    reqs = random_requests(RandomWorkloadConfig(input_len=123, output_len=45, num_requests=20))
    assert len(reqs) == 20
    for r in reqs:
        assert isinstance(r.prompt, list) and len(r.prompt) == 123 == r.input_tokens
        assert r.max_tokens == 45
        assert in_vocab(r.prompt)
    assert len({tuple(r.prompt) for r in reqs}) == 20


def test_random_spread_mean_close_and_clamped():
    reqs = random_requests(
        RandomWorkloadConfig(input_len=200, input_len_stddev=20, output_len=50, output_len_stddev=5, num_requests=1000)
    )
    ins = [r.input_tokens for r in reqs]
    outs = [r.max_tokens for r in reqs]
    assert all(len(r.prompt) == r.input_tokens for r in reqs)
    assert abs(statistics.mean(ins) - 200) < 3 and 15 < statistics.stdev(ins) < 25
    assert abs(statistics.mean(outs) - 50) < 1
    wide = random_requests(RandomWorkloadConfig(input_len=3, input_len_stddev=50, output_len=2, output_len_stddev=50))
    assert min(r.input_tokens for r in wide) >= 1 and min(r.max_tokens for r in wide) >= 1
    assert all(len(r.prompt) == r.input_tokens for r in wide)


def test_random_deterministic_by_seed():
    cfg = RandomWorkloadConfig(input_len=64, input_len_stddev=8, num_requests=10, seed=7)
    assert random_requests(cfg) == random_requests(cfg)
    other = RandomWorkloadConfig(input_len=64, input_len_stddev=8, num_requests=10, seed=8)
    assert random_requests(cfg) != random_requests(other)
    # More requests only append.
    more = random_requests(RandomWorkloadConfig(input_len=64, input_len_stddev=8, num_requests=15, seed=7))
    assert more[:10] == random_requests(cfg)


def test_random_token_range_and_validation():
    reqs = random_requests(RandomWorkloadConfig(input_len=500, num_requests=3, first_token_id=5, vocab_size=10))
    assert all(5 <= t < 10 for r in reqs for t in r.prompt)
    with pytest.raises(ValueError):
        RandomWorkloadConfig(first_token_id=100, vocab_size=100)
    with pytest.raises(ValueError):
        RandomWorkloadConfig(input_len=0)
    with pytest.raises(ValueError):
        RandomWorkloadConfig(input_len_stddev=-1)


# --- shared prefix ------------------------------------------------------------------------------


@pytest.mark.parametrize("assignment", ["round-robin", "random"])
def test_shared_prefix_lengths_and_sharing(assignment):
    cfg = SharedPrefixConfig(
        num_prefixes=3, prefix_len=100, question_len=20, output_len=7, num_requests=30, assignment=assignment
    )
    reqs = shared_prefix_requests(cfg)
    assert len(reqs) == 30
    for r in reqs:
        assert len(r.prompt) == r.input_tokens == 120 and r.max_tokens == 7
        assert in_vocab(r.prompt)
    groups: dict[tuple[int, ...], list] = {}
    for r in reqs:
        groups.setdefault(tuple(r.prompt[:100]), []).append(r)
    assert len(groups) == 3
    if assignment == "round-robin":
        assert all(len(g) == 10 for g in groups.values())
    for a, b in itertools.combinations(reqs, 2):
        same = tuple(a.prompt[:100]) == tuple(b.prompt[:100])
        # Same prefix: exactly prefix_len shared tokens; different prefixes: differ at token 0.
        assert common_prefix_len(a.prompt, b.prompt) == (100 if same else 0)


def test_shared_prefix_deterministic_by_seed():
    def config(seed: int) -> SharedPrefixConfig:
        return SharedPrefixConfig(
            num_prefixes=2, prefix_len=50, question_len=10, num_requests=8, assignment="random", seed=seed
        )

    assert shared_prefix_requests(config(3)) == shared_prefix_requests(config(3))
    assert shared_prefix_requests(config(3)) != shared_prefix_requests(config(4))
    with pytest.raises(ValueError):
        SharedPrefixConfig(num_prefixes=0)
    with pytest.raises(ValueError):
        SharedPrefixConfig(assignment="sticky")  # type: ignore[arg-type]


# --- multi-turn ---------------------------------------------------------------------------------


def test_multi_turn_history_growth():
    cfg = MultiTurnConfig(
        num_users=3, num_rounds=4, system_prompt_len=200, user_history_len=400, answer_len=32, question_len=20
    )
    session = new_session(cfg, 1)
    assert isinstance(session, UserSession)
    req = session.first_request()
    assert req.turn == 0 and req.session_id == "user-1" and req.max_tokens == 32
    assert len(req.prompt) == req.input_tokens == 200 + 400 + 20
    turns = [req]
    for k in range(1, 4):
        answer = list(range(5000 + 100 * k, 5000 + 100 * k + 32))
        nxt = session.next_request(answer)
        assert nxt is not None and nxt.turn == k and nxt.session_id == "user-1"
        prev = turns[-1]
        assert nxt.prompt[: len(prev.prompt) + 32] == prev.prompt + answer
        assert len(nxt.prompt) == nxt.input_tokens == len(prev.prompt) + 32 + 20
        turns.append(nxt)
    # The earlier request objects were not mutated by later turns.
    assert len(turns[0].prompt) == 620
    assert session.next_request(list(range(32))) is None
    assert session.next_request(list(range(32))) is None


def test_multi_turn_shared_system_and_distinct_users():
    cfg = MultiTurnConfig(num_users=4, system_prompt_len=200, user_history_len=400)
    firsts = [new_session(cfg, u).first_request() for u in range(4)]
    assert len({r.session_id for r in firsts}) == 4
    for a, b in itertools.combinations(firsts, 2):
        assert a.prompt[:200] == b.prompt[:200]
        assert a.prompt[200:600] != b.prompt[200:600]
        assert common_prefix_len(a.prompt, b.prompt) < 210
    # The same user's questions differ per round.
    s = new_session(cfg, 0)
    p0 = s.first_request().prompt
    p1 = s.next_request([1234] * cfg.answer_len).prompt
    assert p0[-20:] != p1[-20:]


def test_multi_turn_deterministic_and_pacing():
    cfg = MultiTurnConfig(num_users=10, num_rounds=5, qps=0.5, seed=9)
    a, b = new_session(cfg, 2), new_session(cfg, 2)
    assert a.first_request() == b.first_request()
    assert a.next_request([7] * 32) == b.next_request([7] * 32)
    other = new_session(MultiTurnConfig(num_users=10, num_rounds=5, qps=0.5, seed=10), 2)
    assert other.first_request().prompt != new_session(cfg, 2).first_request().prompt
    assert user_gap_s(cfg) == pytest.approx(20.0)
    assert session_duration_s(cfg) == pytest.approx(80.0)
    assert user_join_interval_s(cfg) == pytest.approx(8.0)
    with pytest.raises(RuntimeError):
        new_session(cfg, 0).next_request([1])
    with pytest.raises(ValueError):
        MultiTurnConfig(qps=0)


# --- trace --------------------------------------------------------------------------------------


def test_trace_synthesize_write_load_round_trip(tmp_path):
    shape = dict(num_requests=50, rate=4.0, num_prefixes=3, prefix_blocks=2, unique_blocks=1, output_length=16, seed=1)
    trace = synthesize_trace(**shape)
    assert trace == synthesize_trace(**shape)
    path = tmp_path / "trace.jsonl"
    write_trace(trace, path)
    entries = load_trace(path)
    assert [e.to_dict() for e in entries] == trace
    assert trace[0]["timestamp"] == 0
    assert all(a["timestamp"] <= b["timestamp"] for a, b in itertools.pairwise(trace))
    assert all(e.input_length == 3 * 512 and len(e.hash_ids) == 3 for e in entries)
    # Prefix ids come from a pool of 3, the rest are unique to each request.
    assert {tuple(e.hash_ids[:2]) for e in entries} <= {(0, 1), (2, 3), (4, 5)}
    tails = [e.hash_ids[2] for e in entries]
    assert len(set(tails)) == 50 and min(tails) >= 6
    # TraceEntry objects write back the same way.
    write_trace(entries, tmp_path / "again.jsonl")
    assert load_trace(tmp_path / "again.jsonl") == entries


def test_trace_synthesize_poisson_rate():
    trace = synthesize_trace(num_requests=4000, rate=10.0, seed=2)
    gaps = [b["timestamp"] - a["timestamp"] for a, b in itertools.pairwise(trace)]
    assert statistics.mean(gaps) == pytest.approx(100.0, rel=0.08)
    assert statistics.stdev(gaps) == pytest.approx(100.0, rel=0.1)  # exponential: stdev == mean


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"input_length": 10, "output_length": 5, "hash_ids": [1]}', "timestamp"),
        ('{"timestamp": 1, "output_length": 5, "hash_ids": [1]}', "input_length"),
        ('{"timestamp": 1, "input_length": 0, "output_length": 5}', "input_length"),
        ('{"timestamp": 1, "input_length": 10, "output_length": 2.5}', "output_length"),
        ('{"timestamp": true, "input_length": 10, "output_length": 5}', "timestamp"),
        ('{"timestamp": 1, "input_length": 10, "output_length": 5, "hash_ids": [1, "x"]}', "hash_ids"),
        ('{"timestamp": 1, "input_length": 10, "output_length": 5, "hash_ids": [-1]}', "hash_ids"),
        ('{"timestamp": 1, "input_length": 10, "output_length": 5, "hash_ids": 3}', "hash_ids"),
    ],
)
def test_trace_malformed_lines_name_the_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    good = '{"timestamp": 0, "input_length": 10, "output_length": 5, "hash_ids": [0]}'
    path.write_text(f"{good}\n\n{line}\n{good}\n")
    with pytest.raises(ValueError, match=rf"bad\.jsonl:3: .*{message}"):
        load_trace(path)


def test_trace_optional_hash_ids_and_extra_keys(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"timestamp": 5.5, "input_length": 10, "output_length": 5, "session_id": "x"}\n')
    (entry,) = load_trace(path)
    assert entry == TraceEntry(timestamp=5.5, input_length=10, output_length=5, hash_ids=[])
    (req,) = trace_requests([entry])
    assert len(req.prompt) == 10 and req.timestamp_s == 0.0 and req.hash_ids == []


def test_trace_timestamps_scaled_and_fields():
    entries = [
        TraceEntry(timestamp=1000, input_length=600, output_length=9, hash_ids=[0, 1]),
        TraceEntry(timestamp=1500, input_length=300, output_length=8, hash_ids=[0]),
        TraceEntry(timestamp=3000.5, input_length=100, output_length=7, hash_ids=[2]),
    ]
    reqs = trace_requests(entries, TraceConfig(time_scale=0.5))
    assert [r.timestamp_s for r in reqs] == pytest.approx([0.0, 0.25, 1.00025])
    assert [r.max_tokens for r in reqs] == [9, 8, 7]
    assert [r.input_tokens for r in reqs] == [len(r.prompt) for r in reqs] == [600, 300, 100]
    assert [r.hash_ids for r in reqs] == [[0, 1], [0], [2]]
    assert reqs[0].hash_ids is not entries[0].hash_ids
    assert all(in_vocab(r.prompt) for r in reqs)
    assert [r.timestamp_s for r in trace_requests(entries)] == pytest.approx([0.0, 0.5, 2.0005])
    assert list(iter_trace_requests(entries, TraceConfig(time_scale=0.5))) == reqs
    with pytest.raises(ValueError):
        TraceConfig(time_scale=-1)


def test_trace_blocks_deterministic_by_seed():
    entries = [TraceEntry(timestamp=0, input_length=1024, output_length=1, hash_ids=[3, 4])]
    a = trace_requests(entries, TraceConfig(seed=1))[0].prompt
    assert a == trace_requests(entries, TraceConfig(seed=1))[0].prompt
    assert a != trace_requests(entries, TraceConfig(seed=2))[0].prompt
    # A hash id is the same block wherever it appears.
    other_entry = TraceEntry(timestamp=0, input_length=1024, output_length=1, hash_ids=[9, 3])
    (b,) = trace_requests([other_entry], TraceConfig(seed=1))
    assert b.prompt[512:] == a[:512]


def shared_block_hashes(a: list[int], b: list[int]) -> int:
    return common_prefix_len(block_hashes(a, HASH_BLOCK), block_hashes(b, HASH_BLOCK))


@pytest.mark.parametrize(
    ("ids_a", "len_a", "ids_b", "len_b", "shared"),
    [
        ([1, 2, 3, 4], 2048, [1, 2, 9, 10], 2048, 2 * 512 // HASH_BLOCK),  # 2 ids shared, then differ
        ([1, 2, 3], 1300, [1, 2, 7], 1100, 2 * 512 // HASH_BLOCK),  # not multiples of 512: partial last block
        ([5, 6], 700, [5, 8], 1000, 1 * 512 // HASH_BLOCK),
        ([5], 300, [6], 300, 0),  # nothing shared
        ([1, 2], 1500, [1, 2], 1200, 2 * 512 // HASH_BLOCK),  # same ids, each extended with its own tokens
        ([1], 400, [1, 2], 1000, 400 // HASH_BLOCK),  # A's only block is cut to 400 tokens
    ],
)
def test_trace_shared_hash_ids_share_exact_blocks(ids_a, len_a, ids_b, len_b, shared):
    entries = [
        TraceEntry(timestamp=0, input_length=len_a, output_length=1, hash_ids=ids_a),
        TraceEntry(timestamp=10, input_length=len_b, output_length=1, hash_ids=ids_b),
    ]
    a, b = trace_requests(entries)
    assert (len(a.prompt), len(b.prompt)) == (len_a, len_b)
    assert shared_block_hashes(a.prompt, b.prompt) == shared


def test_trace_synthetic_pairs_share_exact_blocks():
    trace = synthesize_trace(num_requests=16, rate=2.0, num_prefixes=2, prefix_blocks=2, unique_blocks=2, seed=5)
    entries = [TraceEntry(**t) for t in trace]
    reqs = trace_requests(entries)
    assert any(r.hash_ids[:2] == s.hash_ids[:2] for r, s in itertools.combinations(reqs, 2))
    assert any(r.hash_ids[:2] != s.hash_ids[:2] for r, s in itertools.combinations(reqs, 2))
    for r, s in itertools.combinations(reqs, 2):
        k = common_prefix_len(r.hash_ids, s.hash_ids)
        assert shared_block_hashes(r.prompt, s.prompt) == k * 512 // HASH_BLOCK


def test_multi_turn_several_system_prompts_and_answer_spread():
    from tandem.bench.workloads.multi_turn import MultiTurnConfig, new_session

    config = MultiTurnConfig(
        num_users=4,
        num_system_prompts=3,
        system_prompt_len=32,
        user_history_len=8,
        question_len=4,
        answer_len=50,
        answer_len_stddev=10,
        num_rounds=4,
    )
    firsts = [new_session(config, user).first_request().prompt[:32] for user in range(6)]
    assert firsts[0] == firsts[3] and firsts[1] == firsts[4] and firsts[2] == firsts[5]  # user i → prompt i % 3
    assert len({tuple(p) for p in firsts}) == 3
    session = new_session(config, 0)
    lengths = [session.first_request().max_tokens]
    for _ in range(3):
        lengths.append(session.next_request([7] * 5).max_tokens)
    assert len(set(lengths)) > 1 and all(n >= 1 for n in lengths)
    assert lengths == [r for r in _replay_lengths(config)]  # deterministic


def _replay_lengths(config):
    from tandem.bench.workloads.multi_turn import new_session

    session = new_session(config, 0)
    out = [session.first_request().max_tokens]
    for _ in range(3):
        out.append(session.next_request([7] * 5).max_tokens)
    return out
