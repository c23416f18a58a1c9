"""etcd discovery against a real etcd (tests/infra_servers.py): registration, leases, watch, and
what happens when etcd goes away and comes back, with or without its data."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aetcd
import pytest
from tests.infra_servers import EtcdCluster, EtcdServer
from tests.support import card, free_port, run

from tandem.router.worker_pool import WorkerPool
from tandem.runtime.discovery.base import (
    DiscoveryClosedError,
    DiscoveryConfig,
    DiscoveryEvent,
    EventKind,
    WorkerAlreadyRegisteredError,
    register_when_reachable,
)
from tandem.runtime.discovery.etcd import DiscoveryUnavailableError, EtcdDiscovery, _LeaderAwareClient, parse_endpoints

TTL_S = 2.0
CONFIG = DiscoveryConfig(ttl_s=TTL_S)


class Recorder:
    """Follows ``client.watch()`` in the background: every event, with its time."""

    def __init__(self, client: EtcdDiscovery) -> None:
        self.events: list[tuple[float, DiscoveryEvent]] = []
        self._task = asyncio.create_task(self._follow(client))

    async def _follow(self, client: EtcdDiscovery) -> None:
        async for event in client.watch():
            self.events.append((time.monotonic(), event))

    def seen(self, kind: EventKind | None = None) -> list[str]:
        return [e.card.worker_id for _, e in self.events if kind is None or e.kind is kind]

    def view(self) -> set[str]:
        """The set of workers the events describe."""
        live: set[str] = set()
        for _, event in self.events:
            (live.add if event.kind is EventKind.ADDED else live.discard)(event.card.worker_id)
        return live

    async def wait_for(self, kind: EventKind, worker_id: str, timeout: float = 5.0) -> float:
        """Wait for the event; return the monotonic time it arrived."""
        deadline = time.monotonic() + timeout
        while True:
            for at, event in self.events:
                if event.kind is kind and event.card.worker_id == worker_id:
                    return at
            assert time.monotonic() < deadline, f"no {kind.value} {worker_id} in {self.seen()}"
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def ids(client: EtcdDiscovery, model: str | None = None) -> list[str]:
    return [c.worker_id for c in await client.list(model)]


async def eventually_ids(client: EtcdDiscovery, expected: list[str], timeout: float) -> float:
    """Poll list() (riding out an etcd that is still starting) until it shows ``expected``."""
    start = time.monotonic()
    while True:
        try:
            if await ids(client) == expected:
                return time.monotonic() - start
        except DiscoveryUnavailableError:
            pass
        assert time.monotonic() - start < timeout, f"list() never showed {expected}"
        await asyncio.sleep(0.05)


def test_parse_endpoints() -> None:
    assert parse_endpoints("a:1, http://b:2,[::1]:3") == [("a", 1), ("b", 2), ("[::1]", 3)]
    for bad in ("", "host", "host:0", "host:x", ":1"):
        with pytest.raises(ValueError):
            parse_endpoints(bad)


def test_register_list_watch_withdraw(etcd_server: EtcdServer) -> None:
    async def main() -> None:
        a, b, c = (EtcdDiscovery(etcd_server.endpoint, config=CONFIG) for _ in range(3))
        other_ns = EtcdDiscovery(etcd_server.endpoint, namespace="other", config=CONFIG)
        recorder = Recorder(b)
        try:
            r1 = await a.register(card("w1", model="m-a"))
            r2 = await a.register(card("w2", model="m-b"), ttl_s=7)  # same lease: the first TTL holds
            assert r1.lease == r2.lease and r1.lease.ttl_s == TTL_S
            assert await ids(b) == ["w1", "w2"] and await ids(b, "m-b") == ["w2"]
            assert await ids(other_ns) == []
            await recorder.wait_for(EventKind.ADDED, "w1")
            await recorder.wait_for(EventKind.ADDED, "w2")
            with pytest.raises(WorkerAlreadyRegisteredError, match="already registered in etcd"):
                await c.register(card("w1"))
            with pytest.raises(WorkerAlreadyRegisteredError, match="by this client"):
                await a.register(card("w1"))

            withdrawn_at = time.monotonic()
            await r1.withdraw()
            await r1.withdraw()  # idempotent
            removed_at = await recorder.wait_for(EventKind.REMOVED, "w1", timeout=1.0)
            assert removed_at - withdrawn_at < 1.0
            assert await ids(b) == ["w2"]
            # The withdrawn id is free again, for another process.
            await c.register(card("w1", model="m-c"))
            assert await ids(b, "m-c") == ["w1"]
            # Lease keep-alive: well past the TTL, everything is still there.
            await asyncio.sleep(TTL_S + 1.0)
            assert await ids(b) == ["w1", "w2"]
            assert recorder.seen(EventKind.REMOVED) == ["w1"]
        finally:
            await recorder.stop()
            for client in (a, b, c, other_ns):
                await client.close()

    run(main())


def test_withdraw_cut_short_while_etcd_hangs_is_finished_when_etcd_answers(etcd_server: EtcdServer) -> None:
    async def main() -> None:
        worker = EtcdDiscovery(etcd_server.endpoint, config=CONFIG)
        watcher = EtcdDiscovery(etcd_server.endpoint, config=CONFIG)
        try:
            registration = await worker.register(card("w1"))
            await worker.register(card("w2"))  # keeps the lease (and the keep-alive) busy after w1 goes
            etcd_server.pause()
            try:
                with pytest.raises(TimeoutError):  # the caller's own deadline (the worker gives 5 s)
                    await asyncio.wait_for(registration.withdraw(), 0.5)
            finally:
                etcd_server.resume()
            # The lease lives on (w2), so only the keep-alive task can remove w1 now.
            await eventually_ids(watcher, ["w2"], timeout=TTL_S + 5)
        finally:
            await worker.close()
            await watcher.close()

    run(main(), timeout=60)


def test_card_changed_in_place_is_removed_then_added(etcd_server: EtcdServer) -> None:
    async def main() -> None:
        watcher = EtcdDiscovery(etcd_server.endpoint, config=CONFIG)
        host, port = etcd_server.endpoint.split(":")
        raw = aetcd.Client(host, int(port))
        recorder = Recorder(watcher)
        try:
            await raw.put(watcher.key("w1"), card("w1", model="old").to_json())
            await recorder.wait_for(EventKind.ADDED, "w1")
            await raw.put(watcher.key("w1"), card("w1", model="old").to_json())  # same card: no event
            await raw.put(watcher.key("w1"), card("w1", model="new").to_json())
            await recorder.wait_for(EventKind.REMOVED, "w1")
            await asyncio.sleep(0.2)
            assert [(e.kind, e.card.model) for _, e in recorder.events] == [
                (EventKind.ADDED, "old"),
                (EventKind.REMOVED, "old"),
                (EventKind.ADDED, "new"),
            ]
        finally:
            await recorder.stop()
            await watcher.close()
            await raw.close()

    run(main())


def test_pool_and_worker_started_before_etcd_find_each_other(tmp_path: Path) -> None:
    server = EtcdServer(tmp_path / "etcd")  # not running yet

    async def main() -> None:
        pool = WorkerPool(EtcdDiscovery(server.endpoint, config=CONFIG))
        worker = EtcdDiscovery(server.endpoint, config=CONFIG)
        try:
            await pool.start()  # etcd is down: the pool starts empty instead of failing
            assert pool.workers() == []
            registering = asyncio.create_task(register_when_reachable(worker, card("w1"), wait_s=30))
            await asyncio.sleep(1.0)
            assert not registering.done()  # still retrying
            await asyncio.to_thread(server.start)
            await asyncio.wait_for(registering, 15)
            deadline = time.monotonic() + 10
            while [c.worker_id for c in pool.workers()] != ["w1"]:
                assert time.monotonic() < deadline, "the pool never saw the worker"
                await asyncio.sleep(0.05)
        finally:
            await pool.stop()
            await pool.discovery.close()
            await worker.close()

    try:
        run(main(), timeout=60)
    finally:
        server.kill()


def test_register_gives_up_after_its_wait() -> None:
    async def main() -> None:
        client = EtcdDiscovery(f"127.0.0.1:{free_port()}", config=CONFIG)
        started = time.monotonic()
        try:
            with pytest.raises(DiscoveryUnavailableError, match="etcd unreachable"):
                await register_when_reachable(client, card("w1"), wait_s=1.0)
            assert 1.0 <= time.monotonic() - started < 6.0
        finally:
            await client.close()

    run(main())


def test_watch_on_a_member_that_lost_its_leader_ends(tmp_path: Path) -> None:
    """Require-leader watches: a member with no leader ends the stream ("no leader") instead of
    staying silent, so the watcher lists again elsewhere; a plain aetcd watch stays open."""
    cluster = EtcdCluster(tmp_path, size=3)
    cluster.start()

    async def first_item(watch: Any) -> Any:
        try:
            async for event in watch:
                return event
            return "ended"
        except Exception as exc:  # what ended the stream is the point
            return exc

    async def main() -> None:
        host, port = cluster.members[0].endpoint.split(":")
        leader_aware, plain = _LeaderAwareClient(host, int(port)), aetcd.Client(host, int(port))
        try:
            watches = [await c.watch_prefix(b"/tandem/") for c in (leader_aware, plain)]
            items = [asyncio.ensure_future(first_item(w)) for w in watches]
            await asyncio.sleep(0.5)
            await asyncio.to_thread(cluster.members[1].kill)
            await asyncio.to_thread(cluster.members[2].kill)  # member 0 is alone: no quorum, no leader
            killed_at = time.monotonic()
            done, _ = await asyncio.wait([items[0]], timeout=15)
            assert done, "the require-leader watch stayed open without a leader"
            ended = items[0].result()
            # A connection error to the discovery client: it moves to its next endpoint and lists again.
            assert isinstance(ended, aetcd.ConnectionFailedError) and "no leader" in str(ended), ended
            print(f"watch ended {time.monotonic() - killed_at:.1f}s after the leader was lost: {ended!r}")
            assert not items[1].done()  # without the metadata etcd keeps the stream
            items[1].cancel()
        finally:
            for client in (leader_aware, plain):
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.close(), 3)

    try:
        run(main(), timeout=60)
    finally:
        cluster.kill()


def test_close_revokes_the_lease_and_is_idempotent(etcd_server: EtcdServer) -> None:
    async def main() -> None:
        a, b = EtcdDiscovery(etcd_server.endpoint, config=CONFIG), EtcdDiscovery(etcd_server.endpoint, config=CONFIG)
        recorder = Recorder(b)
        try:
            for worker_id in ("w1", "w2"):
                await a.register(card(worker_id))
            await recorder.wait_for(EventKind.ADDED, "w2")
            closed_at = time.monotonic()
            await a.close()
            await a.close()
            for worker_id in ("w1", "w2"):
                assert await recorder.wait_for(EventKind.REMOVED, worker_id, timeout=1.0) - closed_at < 1.0
            with pytest.raises(DiscoveryClosedError):
                await a.register(card("w3"))
            with pytest.raises(DiscoveryClosedError):
                await a.list()
        finally:
            await recorder.stop()
            await b.close()
        # A closed client ends its watchers.
        c = EtcdDiscovery(etcd_server.endpoint, config=CONFIG)
        watch = c.watch()
        pending = asyncio.ensure_future(anext(watch))
        await asyncio.sleep(0.3)
        await c.close()
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(pending, 2.0)

    run(main())


CHILD = """
import asyncio, sys
from tandem.runtime.discovery.etcd import EtcdDiscovery
from tests.support import card

async def main():
    client = EtcdDiscovery(sys.argv[1])
    await client.register(card("doomed"), ttl_s=float(sys.argv[2]))
    print("registered", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def test_sigkilled_process_disappears_within_ttl(etcd_server: EtcdServer) -> None:
    async def main() -> float:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CHILD, etcd_server.endpoint, str(TTL_S), stdout=subprocess.PIPE
        )
        watcher = EtcdDiscovery(etcd_server.endpoint, config=CONFIG)
        recorder = Recorder(watcher)
        try:
            assert proc.stdout is not None
            assert await asyncio.wait_for(proc.stdout.readline(), 20) == b"registered\n"
            await recorder.wait_for(EventKind.ADDED, "doomed")
            await asyncio.sleep(TTL_S)  # a few keep-alives: the lease outlives its first TTL
            assert await ids(watcher) == ["doomed"]
            proc.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            await proc.wait()
            removed_at = await recorder.wait_for(EventKind.REMOVED, "doomed", timeout=TTL_S + 2.0)
            assert await ids(watcher) == []
            return removed_at - killed_at
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await recorder.stop()
            await watcher.close()

    elapsed = run(main())
    print(f"SIGKILL -> REMOVED: {elapsed:.2f}s (TTL {TTL_S}s)")
    assert elapsed <= TTL_S + 2.0


def test_abandoned_registration_expires_like_a_crash(etcd_server: EtcdServer) -> None:
    async def main() -> None:
        a, b = EtcdDiscovery(etcd_server.endpoint, config=CONFIG), EtcdDiscovery(etcd_server.endpoint, config=CONFIG)
        recorder = Recorder(b)
        try:
            keep, drop = await a.register(card("keep")), await a.register(card("drop"))
            await recorder.wait_for(EventKind.ADDED, "drop")
            drop.abandon()  # the other registration keeps the client's lease alive
            abandoned_at = time.monotonic()
            assert await recorder.wait_for(EventKind.REMOVED, "drop", TTL_S + 2.0) - abandoned_at <= TTL_S + 2.0
            keep.abandon()  # the last one: the lease itself lapses
            abandoned_at = time.monotonic()
            assert await recorder.wait_for(EventKind.REMOVED, "keep", TTL_S + 2.0) - abandoned_at <= TTL_S + 2.0
            await a.register(card("again"))  # a fresh lease
            await recorder.wait_for(EventKind.ADDED, "again")
        finally:
            await recorder.stop()
            await a.close()
            await b.close()

    run(main())


def test_etcd_restart_keeps_registrations_and_watchers(etcd_server: EtcdServer) -> None:
    async def main() -> None:
        worker = EtcdDiscovery(etcd_server.endpoint, config=CONFIG)
        watcher = EtcdDiscovery(etcd_server.endpoint, config=CONFIG)
        recorder = Recorder(watcher)
        try:
            await worker.register(card("w1"))
            await worker.register(card("w2"))
            await recorder.wait_for(EventKind.ADDED, "w2")
            etcd_server.kill()
            await asyncio.sleep(TTL_S + 1.0)  # longer than the TTL: leases cannot be refreshed meanwhile
            assert recorder.seen() == ["w1", "w2"] and recorder.view() == {"w1", "w2"}  # nothing while down
            with pytest.raises(DiscoveryUnavailableError, match="etcd unreachable"):
                await watcher.list()
            etcd_server.start()
            took = await eventually_ids(watcher, ["w1", "w2"], timeout=10)
            # The watch is back: a new registration shows up, and nothing was removed on the way.
            await worker.register(card("w3"))
            await recorder.wait_for(EventKind.ADDED, "w3", timeout=10)
            await asyncio.sleep(TTL_S)  # the lease is kept alive again
            assert await ids(watcher) == ["w1", "w2", "w3"]
            assert recorder.seen(EventKind.REMOVED) == [] and recorder.view() == {"w1", "w2", "w3"}
            print(f"registrations visible {took:.2f}s after etcd restarted")
        finally:
            await recorder.stop()
            await worker.close()
            await watcher.close()

    run(main(), timeout=60)


def test_etcd_restart_without_data_reregisters_everything(etcd_server: EtcdServer) -> None:
    async def main() -> None:
        worker = EtcdDiscovery(etcd_server.endpoint, config=CONFIG)
        crashed = EtcdDiscovery(etcd_server.endpoint, config=CONFIG)
        # The watcher gives workers missing after the wipe its TTL (here 3 s) to come back.
        watcher = EtcdDiscovery(etcd_server.endpoint, config=DiscoveryConfig(ttl_s=3.0))
        recorder = Recorder(watcher)
        try:
            await worker.register(card("w1"))
            await worker.register(card("w2"))
            (await crashed.register(card("dead"))).abandon()  # will not come back after the wipe
            await recorder.wait_for(EventKind.ADDED, "dead")
            etcd_server.kill()
            shutil.rmtree(etcd_server.data_dir / "data")
            etcd_server.start()
            restarted_at = time.monotonic()
            took = await eventually_ids(worker, ["w1", "w2"], timeout=10)
            assert took < 5.0
            print(f"re-registered {took:.2f}s after etcd restarted empty")
            # Watchers follow the new etcd: new workers appear, the one that did not come back goes.
            await worker.register(card("w3"))
            await recorder.wait_for(EventKind.ADDED, "w3", timeout=10)
            removed_at = await recorder.wait_for(EventKind.REMOVED, "dead", timeout=10)
            assert removed_at - restarted_at >= 2.0  # not before the grace
            assert recorder.seen(EventKind.REMOVED) == ["dead"] and recorder.view() == {"w1", "w2", "w3"}
            assert await ids(watcher) == ["w1", "w2", "w3"]
        finally:
            await recorder.stop()
            for client in (worker, crashed, watcher):
                await client.close()

    run(main(), timeout=60)


def test_first_endpoint_dead_fails_over(etcd_server: EtcdServer) -> None:
    async def main() -> None:
        endpoints = f"127.0.0.1:{free_port()},{etcd_server.endpoint}"
        a, b = EtcdDiscovery(endpoints, config=CONFIG), EtcdDiscovery(endpoints, config=CONFIG)
        recorder = Recorder(b)
        try:
            await a.register(card("w1"))
            assert await ids(b) == ["w1"]
            await recorder.wait_for(EventKind.ADDED, "w1")
            await asyncio.sleep(TTL_S + 0.5)  # keep-alive goes to the live endpoint
            assert await ids(b) == ["w1"]
        finally:
            await recorder.stop()
            await a.close()
            await b.close()

    run(main())


def test_unreachable_etcd_is_a_clear_error() -> None:
    async def main() -> None:
        client = EtcdDiscovery(f"127.0.0.1:{free_port()}", config=CONFIG)
        try:
            with pytest.raises(DiscoveryUnavailableError, match="etcd unreachable at 127.0.0.1:"):
                await client.list()
            with pytest.raises(DiscoveryUnavailableError):
                await client.register(card("w1"))
        finally:
            await client.close()

    run(main())


def test_malformed_values_are_ignored(etcd_server: EtcdServer) -> None:
    async def main() -> None:
        a, b = EtcdDiscovery(etcd_server.endpoint, config=CONFIG), EtcdDiscovery(etcd_server.endpoint, config=CONFIG)
        host, port = etcd_server.endpoint.split(":")
        raw = aetcd.Client(host, int(port))
        recorder = Recorder(b)
        try:
            await raw.put(a.key("junk"), b"{not json")
            await raw.put(a.key("mismatch"), card("someone-else").to_json())
            await a.register(card("w1"))
            await recorder.wait_for(EventKind.ADDED, "w1")
            await raw.put(a.key("junk2"), b"[]")
            assert await ids(b) == ["w1"]
            # A known worker whose value turns bad is no longer a worker.
            await raw.put(a.key("w1"), b"garbage")
            await recorder.wait_for(EventKind.REMOVED, "w1")
            assert recorder.seen() == ["w1", "w1"]
        finally:
            await recorder.stop()
            await raw.close()
            await a.close()
            await b.close()

    run(main())
