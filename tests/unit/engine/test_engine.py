"""LLMEngine and AsyncEngine behaviour on a tiny random-weight model (token ids only)."""

from __future__ import annotations

import asyncio

import pytest

from tandem.engine.async_engine import AsyncEngine
from tandem.engine.config import EngineConfig
from tandem.engine.llm_engine import LLMEngine
from tandem.protocols.block_hash import block_hashes
from tandem.protocols.kv_events import AllBlocksCleared, BlockRemoved, BlockStored
from tandem.protocols.kv_export import KVBlockExport
from tandem.protocols.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
PROMPT = list(range(10, 50))  # 40 tokens: 2 full blocks of 16 and a partial one


def make_engine(loaded, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(**{"num_kv_blocks": 32, **kw}), loaded=loaded)


def test_kv_events_stored_then_removed_then_cleared(tiny_loaded):
    engine = make_engine(tiny_loaded, num_kv_blocks=4)
    engine.generate([PROMPT], SamplingParams(max_tokens=1, temperature=0.0))
    events = engine.take_kv_events()
    stored = [e for e in events if isinstance(e, BlockStored)]
    expected = block_hashes(PROMPT, 16)
    assert [h for e in stored for h in e.block_hashes] == expected
    assert stored[0].parent_block_hash is None and stored[0].token_ids == PROMPT[:32]
    # A different prompt needs all 4 blocks: the cached ones are evicted and reported.
    engine.generate([list(range(100, 150))], SamplingParams(max_tokens=1, temperature=0.0))
    removed = [h for e in engine.take_kv_events() if isinstance(e, BlockRemoved) for h in e.block_hashes]
    assert set(expected) <= set(removed)
    assert engine.reset_prefix_cache()
    assert isinstance(engine.take_kv_events()[-1], AllBlocksCleared)


def test_kv_event_batches_are_numbered_in_order_and_reach_the_async_sink(tiny_loaded):
    engine = make_engine(tiny_loaded, num_kv_blocks=4)
    engine.generate([PROMPT], SamplingParams(max_tokens=1, temperature=0.0))
    first = engine.take_kv_event_batch()
    assert first is not None and first[0] == 0 and isinstance(first[1].events[0], BlockStored)
    assert engine.take_kv_event_batch() is None  # nothing new
    engine.generate([list(range(100, 150))], SamplingParams(max_tokens=1, temperature=0.0))
    assert engine.take_kv_event_batch()[0] == 1

    received = []
    async_engine = AsyncEngine(make_engine(tiny_loaded), kv_event_sink=lambda seq, b: received.append((seq, b)))
    try:
        asyncio.run(_collect(async_engine, PROMPT, GREEDY))
    finally:
        async_engine.shutdown()
    seqs = [seq for seq, _ in received]
    assert seqs == list(range(len(seqs))) and seqs
    stored = [h for _, b in received for e in b.events if isinstance(e, BlockStored) for h in e.block_hashes]
    assert stored[:2] == block_hashes(PROMPT, 16)


def test_stop_token_ids_min_tokens_and_max_tokens(tiny_loaded):
    engine = make_engine(tiny_loaded)
    free_run = engine.generate([PROMPT], GREEDY)[0]
    stop_at = free_run[3]
    out = engine.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=[stop_at]))[0]
    assert out == free_run[: free_run.index(stop_at) + 1]
    # min_tokens masks the stop token until 5 tokens exist, so the output changes and is longer.
    out_min = engine.generate(
        [PROMPT], SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=[stop_at], min_tokens=5)
    )[0]
    assert len(out_min) >= 5 and stop_at not in out_min[:5]
    assert len(engine.generate([PROMPT], SamplingParams(max_tokens=3, temperature=0.0))[0]) == 3


def test_eos_stops_unless_ignored(tiny_loaded):
    engine = make_engine(tiny_loaded)
    free_run = engine.generate([PROMPT], GREEDY)[0]
    engine.eos_token_ids = frozenset({free_run[2]})
    engine.add_request("eos", PROMPT, SamplingParams(max_tokens=8, temperature=0.0))
    outs = []
    while engine.has_unfinished_requests:
        outs += engine.step()
    assert outs[-1].finish_reason == "stop" and outs[-1].stop_token_id == free_run[2]
    assert [o.new_token_ids[0] for o in outs] == free_run[: free_run.index(free_run[2]) + 1]
    assert engine.generate([PROMPT], GREEDY)[0] == free_run  # ignore_eos


def test_seeded_sampling_reproducible_across_batches(tiny_loaded):
    engine = make_engine(tiny_loaded)
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=1234, ignore_eos=True)
    alone = engine.generate([PROMPT], params)[0]
    other = SamplingParams(max_tokens=8, temperature=1.0, ignore_eos=True)
    batched = engine.generate([list(range(60, 80)), PROMPT], [other, params])[1]
    assert alone == batched
    assert (
        engine.generate([PROMPT], SamplingParams(max_tokens=8, temperature=1.0, seed=99, ignore_eos=True))[0] != alone
    )


def test_logprobs_reported_per_token(tiny_loaded):
    engine = make_engine(tiny_loaded)
    engine.add_request("lp", PROMPT, SamplingParams(max_tokens=2, temperature=0.0, logprobs=3))
    outs = []
    while engine.has_unfinished_requests:
        outs += engine.step()
    for out in outs:
        (lp,) = out.logprobs
        assert len(lp.top_logprobs) == 3 and lp.top_logprobs[0][0] == lp.token_id  # greedy = top-1
        assert lp.logprob == pytest.approx(lp.top_logprobs[0][1])


@pytest.mark.parametrize(
    "prompt, message",
    [
        ([], "at least one token"),
        ([5, 10**6], "token ids must be in"),
        (list(range(3, 200)) * 3, "context"),
    ],
)
def test_bad_prompts_rejected(tiny_loaded, prompt, message):
    engine = make_engine(tiny_loaded)
    with pytest.raises(ValueError, match=message):
        engine.add_request("bad", prompt, GREEDY)
    assert not engine.has_unfinished_requests


def test_prompt_larger_than_pool_rejected(tiny_loaded):
    engine = make_engine(tiny_loaded, num_kv_blocks=2)
    with pytest.raises(ValueError, match="cannot fit"):
        engine.add_request("big", PROMPT, GREEDY)


def test_export_import_moves_prefix_between_engines(tiny_loaded):
    src, dst = make_engine(tiny_loaded), make_engine(tiny_loaded)
    expected = src.generate([PROMPT], GREEDY)[0]
    export = src.export_kv(PROMPT)
    assert export.block_hashes == block_hashes(PROMPT, 16) and len(export.token_ids) == 32
    import msgspec  # the export crosses the network as msgpack

    wire = msgspec.msgpack.decode(msgspec.msgpack.encode(export), type=KVBlockExport)
    assert dst.import_kv(wire) == 2
    assert dst.import_kv(wire) == 0  # already present
    dst.take_kv_events()
    assert dst.generate([PROMPT], GREEDY)[0] == expected
    assert dst.stats().cached_prompt_tokens_total == 32


def test_import_of_a_later_run_continues_the_cached_prefix(tiny_loaded):
    # A decode worker that holds block 0 imports only block 1 (parent_hash = block 0's hash).
    src, dst = make_engine(tiny_loaded), make_engine(tiny_loaded)
    expected = src.generate([PROMPT], GREEDY)[0]
    export = src.export_kv(PROMPT)
    per_block = len(export.data) // 2
    fields = {f: getattr(export, f) for f in export.__struct_fields__}
    head = KVBlockExport(
        **{
            **fields,
            "block_hashes": export.block_hashes[:1],
            "token_ids": export.token_ids[:16],
            "data": export.data[:per_block],
        }
    )
    tail = KVBlockExport(
        **{
            **fields,
            "block_hashes": export.block_hashes[1:],
            "token_ids": export.token_ids[16:],
            "data": export.data[per_block:],
            "parent_hash": export.block_hashes[0],
        }
    )
    with pytest.raises(ValueError, match="prefix first"):
        dst.import_kv(tail)  # its parent is not here yet: nothing imported
    assert dst.pool.num_free_blocks == dst.pool.num_blocks and dst.pool.num_cached_blocks == 0
    assert dst.import_kv(head) == 1
    assert dst.import_kv(tail) == 1
    dst.take_kv_events()
    assert dst.generate([PROMPT], GREEDY)[0] == expected
    assert dst.stats().cached_prompt_tokens_total == 32


def test_import_rejects_tampered_payload(tiny_loaded):
    src, dst = make_engine(tiny_loaded), make_engine(tiny_loaded)
    src.generate([PROMPT], GREEDY)
    export = src.export_kv(PROMPT)
    bad_tokens = KVBlockExport(
        **{**{f: getattr(export, f) for f in export.__struct_fields__}, "token_ids": [1] + export.token_ids[1:]}
    )
    with pytest.raises(ValueError, match="hashes"):
        dst.import_kv(bad_tokens)
    short = KVBlockExport(**{**{f: getattr(export, f) for f in export.__struct_fields__}, "data": export.data[:-4]})
    with pytest.raises(ValueError, match="bytes"):
        dst.import_kv(short)
    assert dst.pool.num_free_blocks == dst.pool.num_blocks


def test_async_engine_streams_aborts_and_reports_stats(tiny_loaded):
    async def scenario():
        engine = AsyncEngine(make_engine(tiny_loaded))
        try:
            tokens = [o.new_token_ids[0] async for o in engine.generate(PROMPT, GREEDY)]
            assert len(tokens) == GREEDY.max_tokens
            # Leaving a stream early aborts the request and frees its blocks.
            long = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
            stream = engine.generate(PROMPT, long, request_id="long")
            async for out in stream:
                if out.num_output_tokens == 3:
                    break
            await stream.aclose()
            for _ in range(100):
                stats = await engine.call(lambda e: e.stats())
                if stats.num_running == 0:
                    break
                await asyncio.sleep(0.01)
            assert stats.num_running == 0 and stats.num_waiting == 0
            assert stats.kv_usage == 0.0
            # Concurrent streams are independent and equal to their solo outputs.
            results = await asyncio.gather(*[_collect(engine, PROMPT[i:], GREEDY) for i in range(4)])
            solo = [await _collect(engine, PROMPT[i:], GREEDY) for i in range(4)]
            assert results == solo
            # A bad request fails alone.
            with pytest.raises(ValueError):
                await _collect(engine, [], GREEDY)
            assert engine.is_running
        finally:
            engine.shutdown()

    asyncio.run(scenario())


async def _collect(engine: AsyncEngine, prompt, params) -> list[int]:
    return [t async for o in engine.generate(prompt, params) for t in o.new_token_ids]
