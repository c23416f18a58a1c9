"""KV events over the NATS event plane, against a real nats-server with JetStream: the worker's
publisher, the router's follower (stream replay at start, gap replay, dump fallback), load
metrics, malformed messages, and a NATS restart mid-run."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import msgspec
import nats
import pytest
from tests.support import block_stored, run, wait_until

from tandem.protocols.block_hash import block_hashes
from tandem.protocols.kv_events import BlockRemoved, KVEventBatch, encode_batch, make_batch
from tandem.protocols.worker_card import WorkerCard, WorkerCardError
from tandem.router.kv.indexer import KvIndexer
from tandem.router.kv.nats_follower import NatsKvEventFollower
from tandem.router.router_service import RouterService
from tandem.runtime.discovery.memory import MemoryDiscovery, MemoryStore
from tandem.runtime.event_plane import nats_layout
from tandem.runtime.event_plane.config import EventPlaneConfig
from tandem.runtime.event_plane.factory import make_kv_publisher
from tandem.runtime.event_plane.nats_publisher import NatsKvEventPublisher, NatsPublisherConfig
from tandem.runtime.event_plane.nats_router_plane import NatsRouterPlane
from tandem.runtime.request_plane import RequestContext, RequestPlaneClient, RequestPlaneError, RequestPlaneServer

BLOCK = 16

NAMESPACE = "unit"


def _prompt(i: int, blocks: int = 2) -> list[int]:
    return list(range(1000 * (i + 1), 1000 * (i + 1) + blocks * BLOCK))


def _batches(count: int, start: int = 0) -> list[KVEventBatch]:
    """A deterministic mix: each batch stores a 2-block prompt (some continue an earlier one),
    every third also removes the last block of an earlier prompt that nothing continues (a dump
    lists blocks with their parents; an engine evicts a parent only after its children)."""
    out = []
    for i in range(start, start + count):
        events: list = []
        if i % 4 == 3:  # continue prompt i-1 by one block
            base = _prompt(i - 1)
            events.append(block_stored(list(range(77_000 + i * BLOCK, 77_000 + (i + 1) * BLOCK)), base))
        else:
            events.append(block_stored(_prompt(i)))
        if i % 3 == 2 and i >= 3 and (i - 3) % 4 != 2:
            events.append(BlockRemoved(block_hashes=[block_hashes(_prompt(i - 3), BLOCK)[-1]]))
        out.append(make_batch(events))
    return out


def _state(indexer: KvIndexer, worker: str) -> dict[int, int]:
    """Everything the index knows of ``worker`` (engine hash → router hash)."""
    blocks = indexer._workers.get(worker)
    return dict(blocks.by_engine) if blocks else {}


def _reference(batches: list[KVEventBatch], worker: str = "w") -> KvIndexer:
    indexer = KvIndexer(BLOCK)
    for batch in batches:
        for event in batch.events:
            indexer.apply(worker, event)
    return indexer


class Worker:
    """A NATS publisher plus a real request-plane server answering kv_dump from its table."""

    def __init__(self, url: str, **config) -> None:
        self.publisher = NatsKvEventPublisher("w", NatsPublisherConfig(url=url, namespace=NAMESPACE, **config))
        self.server = RequestPlaneServer("127.0.0.1", 0)
        self.server.register("kv_dump", self._kv_dump)
        self.dumps_served = 0
        self.published: list[KVEventBatch] = []

    async def _kv_dump(self, payload, ctx: RequestContext):
        self.dumps_served += 1
        seq, events = self.publisher.dump()
        yield {"seq": seq, "events": msgspec.to_builtins(events)}

    async def start(self) -> None:
        await self.server.start()

    def card(self) -> WorkerCard:
        return WorkerCard(
            worker_id="w",
            model="m",
            tokenizer="m",
            chat_template="m",
            context_length=4096,
            block_size=BLOCK,
            total_kv_blocks=1024,
            request_plane_address=self.server.address,
            kv_events_address=self.publisher.address,
            kv_events_subject=self.publisher.subject,
        )

    def publish(self, batches: list[KVEventBatch]) -> None:
        for batch in batches:
            self.publisher.publish(len(self.published), batch)
            self.published.append(batch)

    def skip(self, batch: KVEventBatch) -> None:
        """A batch that reaches the worker's table (and dumps) but never NATS."""
        with self.publisher._lock:
            self.publisher._table.apply(batch)
            self.publisher.last_seq = len(self.published)
        self.published.append(batch)

    async def flushed(self) -> None:
        await wait_until(
            lambda: self.publisher.connected.is_set() and self.publisher.queued == 0, 15, "publisher flush"
        )

    async def close(self) -> None:
        await asyncio.to_thread(self.publisher.close)
        await self.server.stop(0)


@contextlib.asynccontextmanager
async def _worker(url: str, **config) -> AsyncIterator[Worker]:
    worker = Worker(url, **config)
    await worker.start()
    try:
        yield worker
    finally:
        await worker.close()


@contextlib.asynccontextmanager
async def _follower(worker: Worker, url: str) -> AsyncIterator[tuple[NatsKvEventFollower, KvIndexer, NatsRouterPlane]]:
    plane = NatsRouterPlane(url)
    indexer = KvIndexer(BLOCK)
    client = RequestPlaneClient()
    follower = NatsKvEventFollower(worker.card(), indexer, client, plane)
    follower.start()
    try:
        yield follower, indexer, plane
    finally:
        await follower.stop()
        await plane.close()
        await client.close()


def test_published_batches_reach_the_stream_with_headers_and_the_follower_index_matches(nats_server):
    async def scenario() -> None:
        async with _worker(nats_server.url) as worker, _follower(worker, nats_server.url) as (follower, indexer, _):
            await wait_until(lambda: follower.stats.dumps == 1, what="the initial dump")
            worker.publish(_batches(12))
            await wait_until(lambda: follower.stats.last_seq == 11, what="all batches")
            assert _state(indexer, "w") == _state(_reference(worker.published), "w") != {}
            assert follower.stats.batches_received == 12 and follower.stats.gaps_recovered == 0
            # On the wire: the ZMQ plane's msgpack batch, with seq, worker and dedupe id headers.
            nc = await nats.connect(nats_server.url)
            try:
                stream = nats_layout.stream_name(NAMESPACE)
                msg = await nc.jetstream().get_msg(stream, seq=1, subject=worker.publisher.subject, next=True)
                assert msg.headers[nats_layout.SEQ_HEADER] == "0"
                assert msg.headers[nats_layout.WORKER_HEADER] == "w"
                assert msg.headers[nats_layout.MSG_ID_HEADER] == f"{worker.publisher.token}:0"
                info = await nc.jetstream().stream_info(stream)
                assert info.config.max_age == 3600 and info.config.max_msgs_per_subject == 100_000
            finally:
                await nc.close()

    run(scenario)


def test_a_router_started_late_rebuilds_from_the_stream_alone(nats_server):
    async def scenario() -> None:
        async with _worker(nats_server.url) as worker:
            worker.publish(_batches(20))
            await worker.flushed()
            async with _follower(worker, nats_server.url) as (follower, indexer, _):
                await wait_until(lambda: follower.stats.last_seq == 19, what="the replayed history")
                assert follower.stats.dumps == 0 and worker.dumps_served == 0
                assert _state(indexer, "w") == _state(_reference(worker.published), "w")
                worker.publish(_batches(3, start=20))  # and it keeps following
                await wait_until(lambda: follower.stats.last_seq == 22, what="new batches")
                assert _state(indexer, "w") == _state(_reference(worker.published), "w")

    run(scenario)


def test_a_history_that_no_longer_starts_at_seq_0_means_a_dump(nats_server):
    async def scenario() -> None:
        limits = nats_layout.StreamLimits(max_msgs_per_subject=5)
        async with _worker(nats_server.url, limits=limits) as worker:
            worker.publish(_batches(12))
            await worker.flushed()
            async with _follower(worker, nats_server.url) as (follower, indexer, _):
                await wait_until(lambda: follower.stats.dumps == 1, what="a dump")
                assert follower.stats.last_seq == 11
                worker.publish(_batches(2, start=12))
                await wait_until(lambda: follower.stats.last_seq == 13, what="new batches")
                assert _state(indexer, "w") == _state(_reference(worker.published), "w")

    run(scenario)


def test_a_missed_delivery_is_replayed_from_the_stream(nats_server):
    async def scenario() -> None:
        async with _worker(nats_server.url) as worker, _follower(worker, nats_server.url) as (follower, indexer, _):
            await wait_until(lambda: follower.stats.dumps == 1, what="the initial dump")
            receive = follower._receive
            dropped = []

            async def lossy_receive(seq: int, payload: bytes) -> None:  # as if seq 4 were lost on the way
                if seq == 4 and not dropped:
                    dropped.append(seq)
                    return
                await receive(seq, payload)

            follower._receive = lossy_receive
            worker.publish(_batches(8))
            await wait_until(lambda: follower.stats.last_seq == 7, what="all batches")
            assert dropped == [4]
            assert follower.stats.gaps_recovered == 1 and follower.stats.replayed == 1
            assert follower.stats.dumps == 1 and worker.dumps_served == 1  # no second dump
            assert _state(indexer, "w") == _state(_reference(worker.published), "w")

    run(scenario)


def test_a_batch_stored_after_later_ones_is_found_in_the_stream(nats_server):
    async def scenario() -> None:
        # As when the worker re-sends a batch whose ack was lost after later ones got in.
        async with _worker(nats_server.url) as worker:
            batches = _batches(7)
            worker.publish(batches[:4])
            await worker.flushed()
            nc = await nats.connect(nats_server.url)
            try:
                for seq in (5, 4, 6):
                    await nc.jetstream().publish(
                        worker.publisher.subject, encode_batch(batches[seq]), headers={nats_layout.SEQ_HEADER: str(seq)}
                    )
            finally:
                await nc.close()
            worker.published.extend(batches[4:])
            async with _follower(worker, nats_server.url) as (follower, indexer, _):
                await wait_until(lambda: follower.stats.last_seq == 6, what="seq 6")
                assert follower.stats.gaps_recovered == 1 and follower.stats.replayed == 1
                assert follower.stats.dumps == 0
                assert _state(indexer, "w") == _state(_reference(worker.published), "w")

    run(scenario)


def test_a_gap_the_stream_does_not_have_is_closed_by_a_dump(nats_server):
    async def scenario() -> None:
        async with _worker(nats_server.url) as worker, _follower(worker, nats_server.url) as (follower, indexer, _):
            await wait_until(lambda: follower.stats.dumps == 1, what="the initial dump")
            batches = _batches(7)
            worker.publish(batches[:4])  # seqs 0-3
            await wait_until(lambda: follower.stats.last_seq == 3, what="seq 3")
            worker.skip(batches[4])  # seq 4 never reaches NATS
            worker.publish(batches[5:])  # seqs 5, 6
            await wait_until(lambda: follower.stats.last_seq == 6, what="seq 6")
            assert follower.stats.gaps_recovered == 1 and follower.stats.dumps == 2
            assert _state(indexer, "w") == _state(_reference(worker.published), "w")

    run(scenario)


def test_malformed_messages_are_counted_and_dropped(nats_server):
    async def scenario() -> None:
        async with (
            _worker(nats_server.url, load_interval_s=0.05) as worker,
            _follower(worker, nats_server.url) as (follower, indexer, plane),
        ):
            await wait_until(lambda: follower.stats.dumps == 1, what="the initial dump")
            worker.publish(_batches(2))
            await wait_until(lambda: follower.stats.last_seq == 1, what="seq 1")
            nc = await nats.connect(nats_server.url)
            try:
                js, subject = nc.jetstream(), worker.publisher.subject
                await js.publish(subject, b"no header")
                await js.publish(subject, b"x", headers={nats_layout.SEQ_HEADER: "not a number"})
                await js.publish(subject, b"x", headers={nats_layout.SEQ_HEADER: "-3"})
                await js.publish(subject, b"\xc1 not msgpack", headers={nats_layout.SEQ_HEADER: "2"})
                await js.publish(subject, b"\x93\x01\x02", headers={nats_layout.SEQ_HEADER: "999"})
                load = nats_layout.load_subject(NAMESPACE, worker.publisher.token)
                await nc.publish(load, b"\xc1")
                await nc.publish(load, msgspec.msgpack.encode({"worker_id": 7}))
                await nc.flush()
            finally:
                await nc.close()
            await wait_until(lambda: follower.stats.malformed == 5, what="5 malformed")
            worker.publish(_batches(3, start=2))  # the real seq 2 onwards still apply
            await wait_until(lambda: follower.stats.last_seq == 4, what="seq 4")
            assert _state(indexer, "w") == _state(_reference(worker.published), "w")
            await wait_until(lambda: plane.load_malformed == 2, what="2 malformed load messages")

    run(scenario)


def test_load_metrics_reach_the_router(nats_server):
    async def scenario() -> None:
        async with (
            _worker(nats_server.url, load_interval_s=0.05) as worker,
            _follower(worker, nats_server.url) as (follower, _, plane),
        ):
            worker.publisher.load_source = lambda: {
                "num_running": 3,
                "num_waiting": 1,
                "kv_usage": 0.25,
                "steps_total": 9,
            }
            await wait_until(lambda: plane.load_of("w") is not None, what="load metrics")
            load = plane.load_of("w")
            assert (load["num_running"], load["num_waiting"], load["kv_usage"]) == (3, 1, 0.25)
            assert "steps_total" not in load and load["age_s"] < 5

    run(scenario)


def test_publisher_and_follower_ride_out_a_nats_restart(nats_server):
    async def scenario() -> None:
        async with _worker(nats_server.url) as worker, _follower(worker, nats_server.url) as (follower, indexer, _):
            await wait_until(lambda: follower.stats.dumps == 1, what="the initial dump")
            worker.publish(_batches(5))
            await wait_until(lambda: follower.stats.last_seq == 4, what="seq 4")
            nats_server.kill()
            worker.publish(_batches(5, start=5))  # queued while NATS is away
            await asyncio.sleep(0.5)
            assert worker.publisher.queued > 0
            await asyncio.to_thread(nats_server.start)
            worker.publish(_batches(5, start=10))
            await worker.flushed()
            await wait_until(lambda: follower.stats.last_seq == 14, timeout=20, what="seq 14 after the restart")
            assert _state(indexer, "w") == _state(_reference(worker.published), "w")
            assert worker.publisher.batches_dropped == 0

    run(scenario, timeout=90)


def test_router_replicas_follow_nats_workers_answer_overlap_and_share_bookings(nats_server):
    async def scenario() -> None:
        async with _worker(nats_server.url) as worker:
            store = MemoryStore()
            routers = [RouterService(MemoryDiscovery(store), policy="kv") for _ in range(2)]
            client = RequestPlaneClient()
            for router in routers:
                await router.start()
            try:
                await MemoryDiscovery(store).register(worker.card(), None)
                worker.publish(_batches(4))

                def caught_up() -> bool:
                    followers = [r.policy.followers.get("w") for r in routers]
                    return all(f is not None and f.stats.last_seq == 3 for f in followers)

                await wait_until(caught_up, what="both routers' followers")
                a, b = (r.address for r in routers)
                for address in (a, b):
                    assert await client.call(address, "overlap", {"token_ids": _prompt(0) + [1, 2, 3]}) == {"w": 2}
                    assert await client.call(address, "overlap", {"token_ids": [5] * 40}) == {}
                with pytest.raises(RequestPlaneError, match="bad_request"):
                    await client.call(a, "overlap", {"token_ids": "nope"})
                status = await client.call(a, "status", None)
                assert status["workers"]["w"]["event_transport"] == "nats"
                # A request routed by replica A is booked on replica B too, and released there.
                await wait_until(
                    lambda: all(r.policy.sync is not None and r.policy.sync._nc is not None for r in routers),
                    what="replica sync",
                )
                await client.call(a, "route", {"model": "m", "token_ids": _prompt(7, blocks=4), "request_id": "q1"})
                b_load = routers[1].policy.load
                await wait_until(lambda: b_load.prefill_tokens("w") == 4 * BLOCK, what="A's booking on B")
                await client.call(a, "finished", {"request_id": "q1"})
                await wait_until(lambda: b_load.decode_blocks("w") == 0, what="A's release on B")
            finally:
                await client.close()
                for router in routers:
                    await router.stop()

    run(scenario)


def test_cards_name_a_nats_subject_and_old_cards_still_decode():
    base = dict(
        worker_id="w",
        model="m",
        tokenizer="m",
        chat_template="m",
        context_length=4096,
        block_size=BLOCK,
        total_kv_blocks=8,
        request_plane_address="127.0.0.1:5000",
    )
    card = WorkerCard(**base, kv_events_address="nats://127.0.0.1:4222", kv_events_subject="tandem.ns.kv.w-1a2b")
    assert WorkerCard.from_json(card.to_json()) == card
    old = msgspec.json.encode({**base, "kv_events_address": "tcp://127.0.0.1:5557"})
    assert WorkerCard.from_json(old).kv_events_subject is None
    for bad in (
        {"kv_events_address": "nats://127.0.0.1:4222"},
        {"kv_events_address": "tcp://127.0.0.1:5557", "kv_events_subject": "tandem.ns.kv.w"},
        {"kv_events_address": "nats://127.0.0.1:4222", "kv_events_subject": "tandem.ns.kv.>"},
        {"kv_events_address": "nats://127.0.0.1:4222", "kv_events_subject": "a..b"},
    ):
        with pytest.raises(WorkerCardError):
            WorkerCard.from_json(msgspec.json.encode({**base, **bad}))


def test_subject_tokens_are_safe_and_unique_per_publisher():
    a, b = nats_layout.subject_token("host.x-1 2*>"), nats_layout.subject_token("host.x-1 2*>")
    assert a != b and a.startswith("host_x-1_2__-")
    namespace, token = nats_layout.parse_kv_subject(nats_layout.kv_subject("ns", a))
    assert (namespace, token) == ("ns", a)


def test_zmq_ports_are_refused_with_nats():
    plane = EventPlaneConfig(kind="nats", nats_url="nats://127.0.0.1:1", namespace="ns")
    with pytest.raises(ValueError, match="zmq"):
        make_kv_publisher(plane, 0, events_port=5557)


def test_router_replicas_share_their_load_bookings(nats_server):
    async def scenario() -> None:
        from tandem.router.kv.active_load import ActiveLoad
        from tandem.runtime.event_plane.replica_sync import ReplicaSync, bookings_subject

        planes = [NatsRouterPlane(nats_server.url) for _ in range(2)]
        loads = [ActiveLoad(BLOCK) for _ in range(2)]
        syncs = [ReplicaSync(plane, NAMESPACE, lambda load=load: load) for plane, load in zip(planes, loads)]
        try:
            for sync in syncs:
                await sync.start()
            hashes = block_hashes(_prompt(0), BLOCK)
            loads[0].add_request("r1", "w", hashes, 40, 0)  # what KvRouter.route does on replica 0
            syncs[0].add("r1", "w", hashes, 40, 0)
            await wait_until(
                lambda: loads[1].loads(["w"])["w"] == (40, 3),
                what=lambda: f"the booking on replica 1 (load there: {loads[1].loads(['w'])})",
            )
            assert loads[0].loads(["w"])["w"] == (40, 3)  # replica 0 ignores its own echo
            syncs[0].prefill_done("r1")
            await wait_until(lambda: loads[1].loads(["w"])["w"] == (0, 3), what="prefill done")
            syncs[0].free("r1")
            await wait_until(lambda: loads[1].loads(["w"])["w"] == (0, 0), what="free")
            nc = await planes[0].connection()
            await nc.publish(bookings_subject(NAMESPACE), b"\xc1")
            await nc.publish(bookings_subject(NAMESPACE), msgspec.msgpack.encode(["x", "drop", "r"]))
            await wait_until(lambda: syncs[1].malformed == 2, what="2 malformed bookings")
            assert syncs[1].applied == 3 and syncs[0].applied == 0
        finally:
            for sync, plane in zip(syncs, planes):
                await sync.stop()
                await plane.close()

    run(scenario)
