"""MockerEngine: real scheduler, block pool, KV events and stats; modeled (slept) step times."""

from __future__ import annotations

import asyncio
import time

import pytest

from tandem.engine.async_engine import AsyncEngine
from tandem.engine.mocker import MockerConfig, MockerEngine
from tandem.protocols.block_hash import block_hashes
from tandem.protocols.kv_events import BlockRemoved, BlockStored
from tandem.protocols.sampling_params import SamplingParams

PROMPT = list(range(10, 50))  # 40 tokens: 2 full blocks of 16 and a partial one


def make(**kw) -> MockerEngine:
    return MockerEngine(MockerConfig(**{"speedup_ratio": 0.0, **kw}))


def run_all(engine: MockerEngine) -> dict[str, list]:
    outs: dict[str, list] = {}
    steps = 0
    while engine.has_unfinished_requests:
        for out in engine.step():
            outs.setdefault(out.request_id, []).append(out)
        steps += 1
        assert steps < 100_000
    return outs


# --- the time model ---


@pytest.mark.parametrize("t", [1, 100, 2048, 8192])
def test_prefill_formula(t):
    cfg = MockerConfig()
    assert cfg.prefill_ms(t) == pytest.approx(4.21e-7 * t * t + 0.01518 * t + 16.5)
    assert cfg.prefill_ms(0) == 0.0


@pytest.mark.parametrize("u", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_decode_formula(u):
    cfg = MockerConfig()
    assert cfg.decode_ms(u) == pytest.approx(max(1.0, -25.74 * u * u + 54.01 * u + 5.74))


def test_decode_floor_and_custom_coefficients():
    cfg = MockerConfig(
        decode_quadratic=0.0,
        decode_linear=-100.0,
        decode_constant=0.0,
        decode_min_ms=2.5,
        prefill_quadratic=0.0,
        prefill_linear=1.0,
        prefill_constant=0.0,
    )
    assert cfg.decode_ms(0.5) == 2.5
    assert cfg.prefill_ms(7) == 7.0
    assert cfg.step_ms(7, 0, 0.5) == 7.0
    assert cfg.step_ms(7, 3, 0.5) == 9.5  # sum of both parts
    assert cfg.step_ms(0, 3, 0.5) == 2.5
    assert cfg.step_ms(0, 0, 0.5) == 0.0


def test_engine_reports_modeled_step_times():
    engine = make(num_kv_blocks=64)
    engine.add_request("a", PROMPT, SamplingParams(max_tokens=3))
    engine.step()  # prefill of 40 uncached tokens
    assert engine.last_step_prefill_tokens == 40 and engine.last_step_decode_rows == 0
    assert engine.last_step_ms == pytest.approx(MockerConfig().prefill_ms(40))
    engine.step()  # one decode row; 3 of 64 blocks in use
    assert engine.last_step_prefill_tokens == 0 and engine.last_step_decode_rows == 1
    assert engine.last_step_ms == pytest.approx(MockerConfig().decode_ms(3 / 64))
    # a mixed step: a new prompt joins the decoding one
    engine.add_request("b", list(range(100, 120)), SamplingParams(max_tokens=2))
    engine.step()
    assert engine.last_step_prefill_tokens == 20 and engine.last_step_decode_rows == 1
    assert engine.last_step_ms == pytest.approx(MockerConfig().prefill_ms(20) + MockerConfig().decode_ms(5 / 64))
    run_all(engine)
    assert engine.total_modeled_ms > engine.last_step_ms > 0


def test_speedup_ratio_scales_the_sleep():
    # prefill of 1 token ≈ 16.5 ms; decode at low usage ≈ 5.8 ms. Ratio 2 → about half of it.
    ratio = 2.0
    engine = make(speedup_ratio=ratio, num_kv_blocks=64)
    engine.add_request("a", [5], SamplingParams(max_tokens=4))
    start = time.perf_counter()
    run_all(engine)
    wall = time.perf_counter() - start
    expected = engine.total_modeled_ms / 1000 / ratio
    assert expected > 0.015
    assert expected * 0.95 <= wall <= expected + 0.25
    # a faster ratio sleeps proportionally less
    fast = make(speedup_ratio=20.0, num_kv_blocks=64)
    fast.add_request("a", [5], SamplingParams(max_tokens=4))
    start = time.perf_counter()
    run_all(fast)
    assert time.perf_counter() - start < wall
    assert fast.total_modeled_ms == pytest.approx(engine.total_modeled_ms)


def test_speedup_zero_never_sleeps():
    engine = make(speedup_ratio=0.0)
    for i in range(20):
        engine.add_request(f"r{i}", PROMPT, SamplingParams(max_tokens=200))
    start = time.perf_counter()
    run_all(engine)
    assert engine.total_modeled_ms > 1000  # a second of modeled time...
    assert time.perf_counter() - start < 0.5  # ...takes (almost) no wall time
    assert engine.total_slept_s == 0.0


def test_negative_speedup_rejected():
    with pytest.raises(ValueError):
        MockerConfig(speedup_ratio=-1)


# --- outputs ---


def test_outputs_have_requested_token_counts_and_plausible_ids():
    engine = make()
    for i, n in enumerate([1, 5, 33]):
        engine.add_request(f"r{i}", PROMPT, SamplingParams(max_tokens=n))
    outs = run_all(engine)
    for i, n in enumerate([1, 5, 33]):
        stream = outs[f"r{i}"]
        tokens = [t for o in stream for t in o.new_token_ids]
        assert len(tokens) == n
        assert all(3 <= t < 49152 and t != 2 for t in tokens)
        assert stream[-1].finished and stream[-1].finish_reason == "length"
        assert not any(o.finished for o in stream[:-1])
        assert [o.num_output_tokens for o in stream] == list(range(1, n + 1))
        assert all(o.num_prompt_tokens == 40 for o in stream)
    assert not engine.requests


def test_tokens_are_deterministic_per_seed():
    def tokens(engine_seed, params_seed=None):
        engine = make(seed=engine_seed)
        return engine.generate([PROMPT], SamplingParams(max_tokens=10, seed=params_seed))[0]

    assert tokens(0) == tokens(0)
    assert tokens(0) != tokens(1)
    assert tokens(0, params_seed=7) == tokens(1, params_seed=7)


def test_stop_token_ids_and_min_tokens_honoured():
    # a vocab of 3..5 makes each token likely; a stop token must end the request once min_tokens is met
    engine = make(vocab_size=6)
    engine.add_request("s", [4, 4], SamplingParams(max_tokens=200, min_tokens=5, stop_token_ids=[4]))
    stream = run_all(engine)["s"]
    tokens = [t for o in stream for t in o.new_token_ids]
    assert stream[-1].finish_reason == "stop" and stream[-1].stop_token_id == 4
    assert tokens[-1] == 4 and len(tokens) >= 5
    assert 4 not in tokens[4:-1]


def test_context_length_ends_a_request():
    engine = make(max_model_len=50)
    engine.add_request("c", PROMPT, SamplingParams(max_tokens=100))
    stream = run_all(engine)["c"]
    assert sum(len(o.new_token_ids) for o in stream) == 10
    assert stream[-1].finish_reason == "length"


def test_validation_and_abort():
    engine = make(num_kv_blocks=8)
    with pytest.raises(ValueError):
        engine.add_request("bad", [], SamplingParams())
    with pytest.raises(ValueError):
        engine.add_request("bad", [49152], SamplingParams())
    with pytest.raises(ValueError):
        engine.add_request("bad", list(range(10, 10 + 8 * 16)), SamplingParams())  # cannot fit
    engine.add_request("a", PROMPT, SamplingParams(max_tokens=100))
    with pytest.raises(ValueError):
        engine.add_request("a", PROMPT, SamplingParams())
    engine.step()
    assert engine.stats().num_running == 1 and engine.stats().kv_usage > 0
    assert engine.abort_request("a")
    assert not engine.abort_request("a")
    assert not engine.has_unfinished_requests
    assert engine.stats().kv_usage == 0.0


# --- KV cache, events, stats ---


def test_prefix_caching_and_events():
    engine = make(num_kv_blocks=64)
    engine.generate([PROMPT], SamplingParams(max_tokens=1))
    first = engine.take_kv_event_batch()
    assert first is not None and first[0] == 0
    stored = [h for e in first[1].events if isinstance(e, BlockStored) for h in e.block_hashes]
    assert stored == block_hashes(PROMPT, 16)

    engine.add_request("again", PROMPT, SamplingParams(max_tokens=1))
    outs = run_all(engine)["again"]
    assert outs[-1].num_cached_tokens == 32
    assert engine.last_step_prefill_tokens == 8  # only the uncached tail was modeled
    second = engine.take_kv_event_batch()
    assert second is None or not any(isinstance(e, BlockStored) for e in second[1].events)
    stats = engine.stats()
    assert stats.cached_prompt_tokens_total == 32 and stats.prompt_tokens_total == 80
    assert stats.prefix_cache_hit_rate > 0


def test_kv_event_batches_numbered_in_order():
    engine = make(num_kv_blocks=64)
    seqs = []
    for i in range(4):
        engine.generate([[100 + i] * 40], SamplingParams(max_tokens=2))
        batch = engine.take_kv_event_batch()
        assert batch is not None
        seqs.append(batch[0])
    assert seqs == [0, 1, 2, 3]
    assert engine.take_kv_event_batch() is None
    assert engine.reset_prefix_cache()
    seq, batch = engine.take_kv_event_batch()
    assert seq == 4 and batch.events


def test_stats_are_sensible():
    engine = make(num_kv_blocks=100, max_num_seqs=4)
    for i in range(6):
        engine.add_request(f"r{i}", [7 + i] * 40, SamplingParams(max_tokens=5))
    stats = engine.stats()
    assert (stats.num_running, stats.num_waiting, stats.kv_usage) == (0, 6, 0.0)
    engine.step()
    stats = engine.stats()
    assert stats.num_running == 4 and stats.num_waiting == 2
    assert stats.kv_usage == pytest.approx(12 / 100)  # 4 × 3 blocks
    assert stats.num_free_blocks == 88 and stats.num_total_blocks == 100
    assert stats.steps_total == 1 and stats.generation_tokens_total == 4
    run_all(engine)
    stats = engine.stats()
    assert (stats.num_running, stats.num_waiting, stats.kv_usage) == (0, 0, 0.0)
    assert stats.generation_tokens_total == 30 and stats.prompt_tokens_total == 240


def test_preemption_with_a_tiny_pool_still_finishes_everything():
    engine = make(num_kv_blocks=10, max_num_seqs=8)
    for i in range(6):
        engine.add_request(f"r{i}", [20 + i] * 30, SamplingParams(max_tokens=40))
    outs = run_all(engine)
    assert engine.stats().num_preemptions > 0
    for i in range(6):
        assert sum(len(o.new_token_ids) for o in outs[f"r{i}"]) == 40
        assert outs[f"r{i}"][-1].finish_reason == "length"
    assert engine.stats().kv_usage == 0.0
    removed = [e for e in engine.take_kv_events() if isinstance(e, BlockRemoved)]
    assert removed  # the small pool evicted cached blocks


def test_kv_export_import_between_mockers():
    a, b = make(num_kv_blocks=64), make(num_kv_blocks=64)
    a.generate([PROMPT], SamplingParams(max_tokens=1))
    export = a.export_kv(PROMPT)
    assert len(export.block_hashes) == 2
    assert b.import_kv(export) == 2
    assert b.import_kv(export) == 0
    b.add_request("x", PROMPT, SamplingParams(max_tokens=1))
    assert run_all(b)["x"][-1].num_cached_tokens == 32


# --- concurrency ---


def test_modeled_transfer_time_follows_the_bandwidth_flag():
    # 100 blocks × 16 tokens × 131072 B (Llama-3.1-8B bf16) at 64 GB/s = 3.28 ms.
    config = MockerConfig(speedup_ratio=1.0)
    assert config.transfer_ms(1600) == pytest.approx(1600 * 131072 / 64e9 * 1e3)
    assert MockerEngine(config).modeled_transfer_s(100) == pytest.approx(3.2768e-3)
    assert MockerEngine(MockerConfig(speedup_ratio=4.0)).modeled_transfer_s(100) == pytest.approx(3.2768e-3 / 4)
    assert MockerEngine(MockerConfig(speedup_ratio=0.0)).modeled_transfer_s(100) == 0.0
    assert MockerConfig(kv_transfer_bandwidth_gbs=0).transfer_ms(1600) == 0.0
    with pytest.raises(ValueError):
        MockerConfig(kv_transfer_bandwidth_gbs=-1)


def test_on_finish_hook_runs_on_the_engine_thread_in_the_finishing_step():
    engine = MockerEngine(MockerConfig(speedup_ratio=0.0, num_kv_blocks=64))
    aeng = AsyncEngine(engine)
    seen_steps = []

    def export(core):
        seen_steps.append(core.num_steps)
        return core.export_kv(PROMPT)

    def broken(core):
        raise RuntimeError("hook failed")

    async def main():
        outs = [o async for o in aeng.generate(PROMPT, SamplingParams(max_tokens=3), on_finish=export)]
        failed = [o async for o in aeng.generate(PROMPT[:20], SamplingParams(max_tokens=1), on_finish=broken)]
        return outs, failed

    try:
        outs, failed = asyncio.run(main())
        assert [o.on_finish_result for o in outs[:-1]] == [None] * (len(outs) - 1)
        assert len(outs[-1].on_finish_result.block_hashes) == 2  # the prompt's 2 full blocks
        assert seen_steps == [3]  # right after the third (finishing) step, before any other
        assert failed[-1].finished and failed[-1].on_finish_result is None and aeng.is_running
    finally:
        aeng.shutdown()


def test_async_engine_drives_50_streams():
    engine = MockerEngine(MockerConfig(speedup_ratio=50.0, num_kv_blocks=256))
    batches = []
    aeng = AsyncEngine(engine, kv_event_sink=lambda seq, batch: batches.append(seq))  # type: ignore[arg-type]

    async def one(i: int) -> tuple[int, str]:
        n = 0
        reason = None
        async for out in aeng.generate([30 + i % 7] * (20 + i), SamplingParams(max_tokens=10 + i % 5)):
            n += len(out.new_token_ids)
            reason = out.finish_reason
        return n, reason

    async def main():
        return await asyncio.gather(*(one(i) for i in range(50)))

    try:
        results = asyncio.run(asyncio.wait_for(main(), timeout=30))
    finally:
        aeng.shutdown()
    assert results == [(10 + i % 5, "length") for i in range(50)]
    assert batches == list(range(len(batches))) and batches
    assert engine.stats().num_running == 0


def test_two_mockers_in_one_process_are_independent():
    a = MockerEngine(MockerConfig(speedup_ratio=100.0, num_kv_blocks=64))
    b = MockerEngine(MockerConfig(speedup_ratio=100.0, num_kv_blocks=32, block_size=8))
    ev_a, ev_b = [], []
    aa = AsyncEngine(a, kv_event_sink=lambda seq, batch: ev_a.append((seq, batch)))  # type: ignore[arg-type]
    ab = AsyncEngine(b, kv_event_sink=lambda seq, batch: ev_b.append((seq, batch)))  # type: ignore[arg-type]

    async def drain(aeng, prompt, n):
        return [
            t async for out in aeng.generate(prompt, SamplingParams(max_tokens=n, seed=3)) for t in out.new_token_ids
        ]

    async def main():
        return await asyncio.gather(drain(aa, PROMPT, 12), drain(ab, PROMPT, 7))

    try:
        ta, tb = asyncio.run(asyncio.wait_for(main(), timeout=20))
    finally:
        aa.shutdown()
        ab.shutdown()
    assert len(ta) == 12 and len(tb) == 7
    assert tb == ta[:7]  # same seed and prompt → same token stream, whichever engine
    sa, sb = a.stats(), b.stats()
    assert sa.generation_tokens_total == 12 and sb.generation_tokens_total == 7
    assert sa.num_total_blocks == 64 and sb.num_total_blocks == 32
    assert [seq for seq, _ in ev_a] == list(range(len(ev_a))) and [seq for seq, _ in ev_b] == list(range(len(ev_b)))
    ea = [h for _, bt in ev_a for e in bt.events if isinstance(e, BlockStored) for h in e.block_hashes]
    eb = [h for _, bt in ev_b for e in bt.events if isinstance(e, BlockStored) for h in e.block_hashes]
    assert ea[:2] == block_hashes(PROMPT, 16) and eb[:5] == block_hashes(PROMPT, 8)
    assert a.take_kv_event_batch() is None and b.take_kv_event_batch() is None
