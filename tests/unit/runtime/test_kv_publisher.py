"""KV event publisher: vLLM's ZMQ frames over real sockets, replay from a sequence number, dumps."""

from __future__ import annotations

import asyncio
import struct
import time

import msgspec
import zmq
from tests.vllm_samples import VLLM_032_BATCH

from tandem.engine.async_engine import AsyncEngine
from tandem.engine.mocker import MockerConfig, MockerEngine
from tandem.protocols.block_hash import block_hashes
from tandem.protocols.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, decode_batch, make_batch
from tandem.protocols.sampling_params import SamplingParams
from tandem.runtime.discovery.memory import MemoryDiscovery
from tandem.runtime.event_plane.zmq_publisher import KvEventPublisher, replay
from tandem.runtime.request_plane import RequestPlaneClient
from tandem.worker.service import WorkerService

BLOCK = 16
PROMPTS = [list(range(100, 100 + 40)), list(range(100, 100 + 24)) + list(range(900, 920))]


def _engine(publisher: KvEventPublisher) -> AsyncEngine:
    core = MockerEngine(MockerConfig(speedup_ratio=0.0, block_size=BLOCK, num_kv_blocks=64))
    return AsyncEngine(core, kv_event_sink=publisher.publish)


async def _generate(engine: AsyncEngine, prompt: list[int]) -> None:
    async for _ in engine.generate(prompt, SamplingParams(max_tokens=2, ignore_eos=True)):
        pass


def _subscriber(address: str) -> zmq.Socket:
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.RCVTIMEO, 5000)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(address)
    return sub


def test_batches_arrive_in_vllm_frames_with_consecutive_seqs_and_replay_from_any_seq():
    publisher = KvEventPublisher()
    assert publisher.address.startswith("tcp://127.0.0.1:") and publisher.replay_address.startswith("tcp://127.0.0.1:")
    sub = _subscriber(publisher.address)
    time.sleep(0.3)  # PUB/SUB: let the subscription reach the publisher first
    engine = _engine(publisher)
    try:
        for prompt in PROMPTS:
            asyncio.run(_generate(engine, prompt))
        received = []
        while len(received) < publisher.batches_published:
            topic, seq, payload = sub.recv_multipart()
            assert topic == b"kv-events"
            received.append((struct.unpack(">q", seq)[0], decode_batch(payload)))
        assert [seq for seq, _ in received] == list(range(len(received)))
        stored = [e for _, batch in received for e in batch.events if isinstance(e, BlockStored)]
        # The router can rebuild the contract's hashes from the events' tokens and parents.
        hashes = [h for e in stored for h in e.block_hashes]
        assert block_hashes(PROMPTS[0], BLOCK)[:2] == hashes[:2]
        # Replay: everything from 0, or just the tail.
        assert [s for s, _ in replay(publisher.replay_address, 0)] == [s for s, _ in received]
        tail = replay(publisher.replay_address, received[-1][0])
        assert [s for s, _ in tail] == [received[-1][0]]
        assert replay(publisher.replay_address, 10_000) == []
    finally:
        engine.shutdown()
        sub.close()
        publisher.close()


def test_dump_lists_held_blocks_parents_first_and_empties_on_clear():
    publisher = KvEventPublisher()
    engine = _engine(publisher)
    try:
        for prompt in PROMPTS:
            asyncio.run(_generate(engine, prompt))
        seq, events = publisher.dump()
        assert seq == publisher.last_seq >= 0
        held = [e.block_hashes[0] for e in events]
        seen: set[int] = set()
        for event in events:  # every parent is listed before its child
            assert event.parent_block_hash is None or event.parent_block_hash in seen
            seen.add(event.block_hashes[0])
        assert set(block_hashes(PROMPTS[0], BLOCK)) <= set(held)
        assert set(block_hashes(PROMPTS[1], BLOCK)) <= set(held)
        assert asyncio.run(engine.call(lambda core: core.reset_prefix_cache()))
        # The clear happens between steps; the next step's batch carries AllBlocksCleared.
        asyncio.run(_generate(engine, list(range(5000, 5040))))
        _, events = publisher.dump()
        assert {e.block_hashes[0] for e in events} == set(block_hashes(list(range(5000, 5040)), BLOCK))
    finally:
        engine.shutdown()
        publisher.close()


def test_worker_card_names_the_publisher_and_kv_dump_serves_the_table():
    async def scenario() -> None:
        publisher = KvEventPublisher()
        engine = _engine(publisher)
        discovery = MemoryDiscovery()
        service = WorkerService(
            engine, discovery, model_name="m", tokenizer_source="m", engine_kind="mocker", kv_publisher=publisher
        )
        client = RequestPlaneClient()
        await service.start()
        try:
            (card,) = await discovery.list("m")
            assert card.kv_events_address == publisher.address
            assert card.kv_replay_address == publisher.replay_address
            await _generate(engine, PROMPTS[0])
            dump = await client.call(card.request_plane_address, "kv_dump", None)
            events = msgspec.convert(dump["events"], list[BlockStored])
            assert dump["seq"] == publisher.last_seq
            assert [e.block_hashes[0] for e in events] == block_hashes(PROMPTS[0], BLOCK)
        finally:
            await client.close()
            await service.drain(timeout=1)

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_replay_reads_vllms_reply_shape_with_a_topic_frame():
    """vLLM's ROUTER answers ``[id, empty, topic, seq, payload]`` and ends with seq -1 (its
    distributed/kv_events.py ``_service_replay``); Tandem's publisher leaves the topic out."""
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")

    def serve() -> None:
        client_id, empty, start = router.recv_multipart()
        assert empty == b"" and int.from_bytes(start, "big") == 1
        for seq in (1, 2):
            router.send_multipart((client_id, b"", b"kv", seq.to_bytes(8, "big"), VLLM_032_BATCH))
        router.send_multipart((client_id, b"", b"", struct.pack(">q", -1), b""))

    async def scenario() -> list[tuple[int, bytes]]:
        server = asyncio.get_running_loop().run_in_executor(None, serve)
        got = await asyncio.to_thread(replay, f"tcp://127.0.0.1:{port}", 1)
        await server
        return got

    try:
        got = asyncio.run(asyncio.wait_for(scenario(), 10))
    finally:
        router.close()
    assert [seq for seq, _ in got] == [1, 2]
    assert decode_batch(got[0][1]).events[0].token_ids == list(range(32))


def test_the_table_keeps_each_medium_apart_and_lists_parents_first_across_them():
    publisher = KvEventPublisher()
    try:
        a, b = list(range(16)), list(range(100, 116))
        ha, hb = block_hashes(a + b, BLOCK)
        events = [
            BlockStored([ha], None, a, BLOCK, medium=None),  # None is the pool, like "GPU"
            BlockStored([hb], ha, b, BLOCK, medium="CPU"),  # offloaded: its parent stays in the pool
            BlockStored([hb], ha, b, BLOCK, medium="Disk"),
            BlockRemoved([ha], medium="GPU"),
            BlockStored([ha], None, a, BLOCK, medium="GPU"),  # back, now after its child in the table
            BlockRemoved([hb], medium="disk"),  # only the disk copy goes
        ]
        publisher.publish(0, make_batch(events))
        seq, dump = publisher.dump()
        assert seq == 0
        assert [(e.block_hashes, e.parent_block_hash, e.medium) for e in dump] == [
            ([ha], None, "GPU"),
            ([hb], ha, "CPU"),
        ]
        publisher.publish(1, make_batch([AllBlocksCleared()]))  # clears every medium
        assert publisher.dump() == (1, [])
    finally:
        publisher.close()
