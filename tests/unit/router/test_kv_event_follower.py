"""The router's KV event follower against a real publisher: dump at start, then the stream;
a gap is closed by replay, or by a dump when the replay buffer no longer reaches back."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import msgspec
from tests.support import block_stored, wait_until

from tandem.protocols.kv_events import BlockRemoved, encode_batch, make_batch
from tandem.protocols.worker_card import WorkerCard
from tandem.router.kv.indexer import KvIndexer
from tandem.router.kv.tiers import TieredMatch
from tandem.router.kv.zmq_follower import KvEventFollower
from tandem.runtime.event_plane.zmq_publisher import KvEventPublisher, PublisherConfig
from tandem.runtime.request_plane import RequestContext, RequestPlaneClient, RequestPlaneServer

BLOCK = 16


@contextlib.asynccontextmanager
async def _following(
    publisher: KvEventPublisher, serves_kv_dump: bool = True, indexer: KvIndexer | None = None
) -> AsyncIterator[tuple[KvEventFollower, KvIndexer]]:
    """A started follower of ``publisher`` (with a kv_dump endpoint unless the worker, like vLLM,
    serves none) feeding ``indexer`` (a new one by default), torn down with the publisher."""

    async def kv_dump(payload, ctx: RequestContext):
        seq, events = publisher.dump()
        yield {"seq": seq, "events": msgspec.to_builtins(events)}

    server = RequestPlaneServer("127.0.0.1", 0)
    if serves_kv_dump:
        server.register("kv_dump", kv_dump)
    await server.start()
    card = WorkerCard(
        worker_id="w",
        model="m",
        tokenizer="m",
        chat_template="m",
        context_length=4096,
        block_size=BLOCK,
        total_kv_blocks=1024,
        request_plane_address=server.address,
        kv_events_address=publisher.address,
        kv_replay_address=publisher.replay_address,
        serves_kv_dump=serves_kv_dump,
    )
    indexer = indexer or KvIndexer(BLOCK)
    follower = KvEventFollower(card, indexer, RequestPlaneClient())
    follower.start()
    try:
        yield follower, indexer
    finally:
        await follower.stop()
        await server.stop(0)
        publisher.close()


def test_dump_at_start_then_stream_then_replay_closes_a_gap():
    async def scenario() -> None:
        publisher = KvEventPublisher()
        a = list(range(100, 100 + 2 * BLOCK))
        publisher.publish(0, make_batch([block_stored(a)]))  # before the router knows the worker
        async with _following(publisher) as (follower, indexer):
            await wait_until(lambda: follower.stats.dumps == 1)
            assert indexer.find_matches(indexer.sequence_hashes(a)) == {"w": 2}
            b = list(range(500, 500 + BLOCK))
            publisher.publish(1, make_batch([block_stored(b)]))
            await wait_until(lambda: follower.stats.last_seq == 1)
            # A batch the subscriber never saw (seq 2 goes only into the replay buffer)...
            c = list(range(900, 900 + BLOCK))
            with publisher._lock:
                publisher._buffer.append((2, encode_batch(make_batch([block_stored(c)]))))
                publisher._table.apply(make_batch([block_stored(c)]))
            d = list(range(1300, 1300 + BLOCK))
            publisher.publish(3, make_batch([block_stored(d)]))
            await wait_until(lambda: follower.stats.last_seq == 3)
            # ...is recovered by replay, not by a new dump.
            assert follower.stats.gaps_recovered == 1 and follower.stats.dumps == 1
            for tokens in (b, c, d):
                assert indexer.find_matches(indexer.sequence_hashes(tokens)) == {"w": 1}

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_a_gap_older_than_the_replay_buffer_is_closed_by_a_dump():
    async def scenario() -> None:
        publisher = KvEventPublisher(PublisherConfig(buffer_size=1))
        async with _following(publisher) as (follower, indexer):
            await wait_until(lambda: follower.stats.dumps == 1)
            e = list(range(2000, 2000 + BLOCK))
            f = list(range(3000, 3000 + BLOCK))
            with publisher._lock:  # seq 0 reaches only the table: the subscriber misses it
                publisher._table.apply(make_batch([block_stored(e)]))
            publisher.publish(1, make_batch([block_stored(f)]))  # the buffer (size 1) now holds only seq 1
            await wait_until(lambda: follower.stats.dumps == 2)
            assert follower.stats.gaps_recovered == 1
            for tokens in (e, f):
                assert indexer.find_matches(indexer.sequence_hashes(tokens)) == {"w": 1}

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_a_worker_without_a_dump_has_its_entries_dropped_and_rebuilt_after_an_unrecoverable_gap():
    async def scenario() -> None:
        publisher = KvEventPublisher(PublisherConfig(buffer_size=1))
        async with _following(publisher, serves_kv_dump=False) as (follower, indexer):
            await asyncio.sleep(0.3)  # the subscription reaches the publisher (there is no dump to wait for)
            g = list(range(4000, 4000 + BLOCK))
            publisher.publish(0, make_batch([block_stored(g)]))
            await wait_until(lambda: follower.stats.last_seq == 0)
            assert indexer.find_matches(indexer.sequence_hashes(g)) == {"w": 1}
            e = list(range(5000, 5000 + BLOCK))
            f = list(range(6000, 6000 + BLOCK))
            with publisher._lock:  # seq 1 reaches only the table: the subscriber misses it
                publisher._table.apply(make_batch([block_stored(e)]))
            publisher.publish(2, make_batch([block_stored(f)]))  # the buffer (size 1) holds only seq 2
            await wait_until(lambda: follower.stats.last_seq == 2)
            assert follower.stats.rebuilds == 1 and follower.stats.dumps == 0 and follower.stats.gaps_recovered == 1
            # What the router knew before the gap is dropped (it may be stale), what came after is indexed.
            assert indexer.find_matches(indexer.sequence_hashes(g)) == {}
            assert indexer.find_matches(indexer.sequence_hashes(e)) == {}
            assert indexer.find_matches(indexer.sequence_hashes(f)) == {"w": 1}

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_a_dump_with_mixed_mediums_rebuilds_every_tier_and_keeps_the_node_tier():
    async def scenario() -> None:
        publisher = KvEventPublisher()
        a = list(range(100, 100 + 2 * BLOCK))
        b = list(range(700, 700 + BLOCK))
        gpu = block_stored(a)
        offloaded = msgspec.structs.replace(block_stored(a[BLOCK:], a[:BLOCK]), medium="CPU")
        on_disk = msgspec.structs.replace(block_stored(b, a), medium="DISK")
        batch = [gpu, offloaded, BlockRemoved(block_hashes=offloaded.block_hashes), on_disk]
        publisher.publish(0, make_batch(batch))  # before the router knows the worker
        indexer = KvIndexer(BLOCK)
        indexer.set_node_tier("w", "node-1")
        indexer.set_node_tier("n", "node-1")
        n_block = list(range(3000, 3000 + BLOCK))
        indexer.apply("n", msgspec.structs.replace(block_stored(n_block), medium="CPU"))  # a neighbour's
        async with _following(publisher, indexer=indexer) as (follower, _):
            await wait_until(lambda: follower.stats.dumps == 1)
            # w: a's first block in its pool, the second in the node tier, b on disk.
            assert indexer.find_tiered_matches(indexer.sequence_hashes(a + b)) == {"w": TieredMatch(1, 1, 1)}
            assert indexer.find_matches(indexer.sequence_hashes(n_block)) == {"w": 1, "n": 1}
            assert indexer.stats.unknown_parents == 0

    asyncio.run(asyncio.wait_for(scenario(), 30))
