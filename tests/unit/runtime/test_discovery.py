"""Discovery (memory and file) and the worker card: registration, leases, watch, crash safety."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from tests.support import card as make_card
from tests.support import run, wait_until

from tandem.protocols.worker_card import WorkerCard, WorkerCardError
from tandem.runtime.discovery import file as discovery_file
from tandem.runtime.discovery import make_discovery
from tandem.runtime.discovery.base import (
    Discovery,
    DiscoveryClosedError,
    DiscoveryConfig,
    DiscoveryEvent,
    EventKind,
    WorkerAlreadyRegisteredError,
)
from tandem.runtime.discovery.file import (
    FileDiscovery,
    FileRecord,
    atomic_write_bytes,
    file_name_for,
)
from tandem.runtime.discovery.memory import MemoryDiscovery, MemoryStore, shared_store

FAST = DiscoveryConfig(ttl_s=5.0, poll_interval_s=0.05)


DISCOVERY_CARD_FIELDS: dict[str, Any] = {
    "tokenizer": "/models/m",
    "chat_template": "/models/m",
    "context_length": 2048,
    "total_kv_blocks": 1000,
    "request_plane_address": "127.0.0.1:7001",
    "kv_events_address": "tcp://127.0.0.1:7002",
}


def card(worker_id: str = "w1", model: str = "m-a", **overrides: Any) -> WorkerCard:
    """A card with the optional fields set too, so each backend's round trip checks them."""
    return make_card(worker_id, model, **{**DISCOVERY_CARD_FIELDS, **overrides})


async def next_event(events: AsyncIterator[DiscoveryEvent], timeout: float = 2.0) -> DiscoveryEvent:
    return await asyncio.wait_for(anext(events), timeout)


async def ids(client: Discovery, model: str | None = None) -> list[str]:
    return [c.worker_id for c in await client.list(model)]


# ---------------------------------------------------------------- worker card


def test_card_round_trips_json_msgpack_dict() -> None:
    c = card(role="decode", engine="mocker", metrics_address=None)
    assert WorkerCard.from_json(c.to_json()) == c
    assert WorkerCard.from_json(c.to_json().decode()) == c
    assert WorkerCard.from_msgpack(c.to_msgpack()) == c
    assert WorkerCard.from_dict(c.to_dict()) == c


def test_card_defaults_and_unknown_fields() -> None:
    c = WorkerCard.from_json(
        b'{"worker_id":"w","model":"m","tokenizer":"t","chat_template":"t","context_length":8,'
        b'"block_size":16,"total_kv_blocks":4,"request_plane_address":"[::1]:80","future":1}'
    )
    assert (c.role, c.engine) == ("agg", "builtin")
    assert (c.kv_events_address, c.metrics_address) == (None, None)
    assert c.started_at > 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"context_length": 0}, "context_length must be a positive integer"),
        ({"block_size": "16"}, "Expected `int`, got `str`"),
        ({"role": "both"}, "Invalid enum value 'both'"),
        ({"engine": "sglang"}, "Invalid enum value 'sglang'"),
        ({"request_plane_address": "localhost"}, "must be 'host:port'"),
        ({"request_plane_address": "localhost:70000"}, "must be 'host:port'"),
        ({"model": ""}, "model must be a non-empty string"),
        ({"worker_id": None}, r"Expected `str`, got `(null|None)` - at `\$.worker_id`"),
    ],
)
def test_card_rejects_bad_values(change: dict[str, Any], message: str) -> None:
    data = {**card().to_dict(), **change}
    with pytest.raises(WorkerCardError, match=message):
        WorkerCard.from_json(msgspec.json.encode(data))
    with pytest.raises(WorkerCardError, match=message):
        WorkerCard.from_msgpack(msgspec.msgpack.encode(data))


def test_card_rejects_malformed_documents() -> None:
    with pytest.raises(WorkerCardError, match="JSON"):
        WorkerCard.from_json(b'{"worker_id": "w"')
    with pytest.raises(WorkerCardError, match="missing required field `model`"):
        WorkerCard.from_json(b'{"worker_id": "w"}')
    with pytest.raises(WorkerCardError, match="msgpack"):
        WorkerCard.from_msgpack(b"\xc1garbage")
    with pytest.raises(WorkerCardError):
        WorkerCard.from_dict([1, 2, 3])
    with pytest.raises(ValueError, match="total_kv_blocks"):
        card(total_kv_blocks=-1)  # direct construction validates too


# ---------------------------------------------------------------- both implementations

Backend = Callable[..., Discovery]


@pytest.fixture(params=["memory", "file"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """A factory of clients sharing one backend (one store / one directory)."""
    store = MemoryStore()

    def new_client(config: DiscoveryConfig = FAST) -> Discovery:
        if request.param == "memory":
            return MemoryDiscovery(store, config)
        return FileDiscovery(tmp_path / "discovery", config)

    return new_client


def test_register_list_filter(backend: Backend) -> None:
    async def body() -> None:
        async with backend() as client:
            await client.register(card("w2", "m-b"))
            await client.register(card("w1", "m-a"))
            await client.register(card("w3", "m-a", role="prefill"))
            assert await ids(client) == ["w1", "w2", "w3"]
            assert await ids(client, "m-a") == ["w1", "w3"]
            assert await ids(client, "nope") == []
            assert (await client.list("m-b"))[0] == card("w2", "m-b")

    run(body())


def test_withdraw_removes_and_is_idempotent(backend: Backend) -> None:
    async def body() -> None:
        async with backend() as client:
            registration = await client.register(card("w1"))
            async with await client.register(card("w2")):
                assert await ids(client) == ["w1", "w2"]
            assert await ids(client) == ["w1"]
            await registration.withdraw()
            await registration.withdraw()
            assert await ids(client) == []
            assert not registration.active

    run(body())


def test_watch_sees_current_set_then_changes(backend: Backend) -> None:
    async def body() -> None:
        async with backend() as client:
            first = await client.register(card("w1"))
            events = client.watch()
            assert await next_event(events) == DiscoveryEvent(EventKind.ADDED, card("w1"))
            second = await client.register(card("w2"))
            assert await next_event(events) == DiscoveryEvent(EventKind.ADDED, card("w2"))
            await first.withdraw()
            assert await next_event(events) == DiscoveryEvent(EventKind.REMOVED, card("w1"))
            await second.withdraw()
            assert await next_event(events) == DiscoveryEvent(EventKind.REMOVED, card("w2"))
            await events.aclose()

    run(body())


def test_two_clients_see_each_other(backend: Backend) -> None:
    async def body() -> None:
        async with backend() as worker_side, backend() as router_side:
            events = router_side.watch()
            registration = await worker_side.register(card("w1"))
            assert await next_event(events) == DiscoveryEvent(EventKind.ADDED, card("w1"))
            assert await ids(router_side) == ["w1"]
            await registration.withdraw()
            assert await next_event(events) == DiscoveryEvent(EventKind.REMOVED, card("w1"))
            await events.aclose()

    run(body())


def test_heartbeat_keeps_entry_alive_past_ttl(backend: Backend) -> None:
    async def body() -> None:
        async with backend() as client:
            registration = await client.register(card("w1"), ttl_s=0.3)
            await asyncio.sleep(0.8)
            assert await ids(client) == ["w1"]
            assert registration.active

    run(body())


def test_entry_expires_when_heartbeat_stops(backend: Backend) -> None:
    async def body() -> None:
        async with backend() as client, backend() as observer:
            events = observer.watch()
            registration = await client.register(card("w1"), ttl_s=0.3)
            assert await next_event(events) == DiscoveryEvent(EventKind.ADDED, card("w1"))
            registration.abandon()  # what a crash looks like: no withdraw, no heartbeat
            stopped = time.monotonic()
            assert await next_event(events) == DiscoveryEvent(EventKind.REMOVED, card("w1"))
            assert time.monotonic() - stopped < 0.3 + 0.3
            assert await ids(observer) == []
            await events.aclose()

    run(body())


def test_duplicate_worker_id_is_refused_until_expiry(backend: Backend) -> None:
    async def body() -> None:
        async with backend() as a, backend() as b:
            registration = await a.register(card("w1"), ttl_s=0.3)
            with pytest.raises(WorkerAlreadyRegisteredError, match="w1"):
                await b.register(card("w1", "other"))
            registration.abandon()
            await asyncio.sleep(0.4)
            await b.register(card("w1", "other"))  # the dead lease no longer blocks the id
            assert [c.model for c in await a.list()] == ["other"]

    run(body())


def test_close_withdraws_and_ends_watchers(backend: Backend) -> None:
    async def body() -> None:
        observer = backend()
        client = backend()
        await client.register(card("w1"))
        events = client.watch()
        assert (await next_event(events)).kind is EventKind.ADDED
        await client.close()
        with pytest.raises(StopAsyncIteration):
            await next_event(events)
        assert await ids(observer) == []
        with pytest.raises(DiscoveryClosedError):
            await client.register(card("w2"))
        await client.close()
        await observer.close()

    run(body())


# ---------------------------------------------------------------- file specifics


def file_record(c: WorkerCard, expires_at: float, lease_id: str = "lease") -> bytes:
    record = FileRecord(lease_id=lease_id, ttl_s=1.0, expires_at=expires_at, pid=1, hostname="h", card=c)
    return msgspec.json.encode(record)


def test_file_ignores_garbage_and_deletes_expired(tmp_path: Path) -> None:
    bad_card = {**card("bad").to_dict(), "role": "x"}
    (tmp_path / "truncated.json").write_bytes(file_record(card("t"), time.time() + 60)[:-5])
    (tmp_path / "empty.json").write_bytes(b"")
    (tmp_path / "schema.json").write_bytes(b'{"hello": "world"}')
    (tmp_path / "badcard.json").write_bytes(
        msgspec.json.encode(
            {"lease_id": "l", "ttl_s": 1, "expires_at": time.time() + 60, "pid": 1, "hostname": "h", "card": bad_card}
        )
    )
    (tmp_path / "notes.txt").write_text("not an entry")
    (tmp_path / "dir.json").mkdir()
    (tmp_path / ".w9.json.123.tmp").write_bytes(file_record(card("w9"), time.time() + 60))
    stale_tmp = tmp_path / ".old.json.1.abc.tmp"
    stale_tmp.write_bytes(b"{")
    os.utime(stale_tmp, (time.time() - 3600, time.time() - 3600))
    expired = tmp_path / "expired.json"
    expired.write_bytes(file_record(card("expired"), time.time() - 1))
    (tmp_path / "alive.json").write_bytes(file_record(card("alive"), time.time() + 60))

    async def body() -> None:
        async with FileDiscovery(tmp_path, FAST) as client:
            assert await ids(client) == ["alive"]

    run(body())
    assert not expired.exists()
    assert not stale_tmp.exists()
    assert (tmp_path / "truncated.json").exists()  # unreadable files are left alone


def test_file_scan_rereads_only_changed_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(3):
        (tmp_path / f"w{i}.json").write_bytes(file_record(card(f"w{i}"), time.time() + 60))
    reads: list[Path] = []
    real_read = discovery_file.read_record
    monkeypatch.setattr(discovery_file, "read_record", lambda p: reads.append(p) or real_read(p))
    client = FileDiscovery(tmp_path, FAST)
    assert len(client.scan()) == 3 and len(reads) == 3
    assert len(client.scan()) == 3 and len(reads) == 3
    atomic_write_bytes(tmp_path / "w1.json", file_record(card("w1", "m-b"), time.time() + 60))
    assert client.scan()["w1"][1].model == "m-b"
    assert [p.name for p in reads[3:]] == ["w1.json"]


def test_file_names_are_safe(tmp_path: Path) -> None:
    assert file_name_for("worker-1.a_b") == "worker-1.a_b.json"
    odd = file_name_for("../etc/passwd host:1")
    assert "/" not in odd and odd.endswith(".json") and not odd.startswith(".")
    assert file_name_for("a/b") != file_name_for("a_b")

    async def body() -> None:
        async with FileDiscovery(tmp_path, FAST) as client:
            await client.register(card("../x y"))
            assert await ids(client) == ["../x y"]
            assert [p.parent for p in tmp_path.iterdir()] == [tmp_path]

    run(body())


def test_file_writes_are_atomic_for_tight_readers(tmp_path: Path) -> None:
    """A reader in a tight loop never sees a half-written file while the owner rewrites it."""
    path = tmp_path / "w1.json"
    payloads = [file_record(card("w1", "m" * n), time.time() + 60) for n in (1, 20_000, 200_000)]
    atomic_write_bytes(path, payloads[0])
    stop = threading.Event()
    errors: list[Exception] = []
    reads = 0

    def reader() -> None:
        nonlocal reads
        while not stop.is_set():
            try:
                msgspec.json.decode(path.read_bytes(), type=FileRecord)
                reads += 1
            except Exception as exc:  # any failure is the bug we look for
                errors.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(600):
            atomic_write_bytes(path, payloads[i % 3])
    finally:
        stop.set()
        thread.join(timeout=5)
    assert errors == [] and reads > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w1.json"]  # no tmp files left


def test_file_heartbeat_rewrites_never_hide_the_worker(tmp_path: Path) -> None:
    """Through the API: a heartbeat every 10 ms, another client scanning in a tight loop."""
    config = DiscoveryConfig(ttl_s=2.0, heartbeat_fraction=0.005, poll_interval_s=0.05)
    reader = FileDiscovery(tmp_path, config)
    misses: list[int] = []

    async def body() -> None:
        async with FileDiscovery(tmp_path, config) as writer:
            await writer.register(card("w1"))
            stop = threading.Event()

            def scan_loop() -> int:
                scans = 0
                while not stop.is_set():
                    if "w1" not in reader.scan():
                        misses.append(scans)
                    scans += 1
                return scans

            scanning = asyncio.create_task(asyncio.to_thread(scan_loop))
            await asyncio.sleep(0.6)
            stop.set()
            assert await scanning > 0

    run(body())
    assert misses == []


SUBPROCESS_WORKER = """
import asyncio, sys
from tandem.runtime.discovery.file import FileDiscovery
from tandem.protocols.worker_card import WorkerCard

async def main():
    client = FileDiscovery(sys.argv[1])
    await client.register(WorkerCard(
        worker_id="child", model="m", tokenizer="t", chat_template="t", context_length=64,
        block_size=16, total_kv_blocks=8, request_plane_address="127.0.0.1:9"),
        ttl_s=float(sys.argv[2]))
    await asyncio.sleep(60)

asyncio.run(main())
"""


def test_file_sigkilled_worker_disappears_within_ttl(tmp_path: Path) -> None:
    ttl = 1.0
    proc = subprocess.Popen([sys.executable, "-c", SUBPROCESS_WORKER, str(tmp_path), str(ttl)])

    async def body() -> None:
        async with FileDiscovery(tmp_path, FAST) as client:

            async def present() -> bool:
                return await ids(client) == ["child"]

            async def gone() -> bool:
                return await ids(client) == []

            await wait_until(present, timeout=8.0)
            await asyncio.sleep(ttl * 1.2)  # the child's heartbeat carries it past one TTL
            assert await present()
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=5)
            assert await wait_until(gone, timeout=ttl + 0.5) <= ttl + 0.2

    try:
        run(body())
    finally:
        proc.kill()
        proc.wait(timeout=5)


# ---------------------------------------------------------------- factory and config


def test_make_discovery_specs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(make_discovery("memory"), MemoryDiscovery)
    assert make_discovery("memory:x").store is shared_store("x")  # type: ignore[attr-defined]
    assert make_discovery("memory").store is not shared_store("x")  # type: ignore[attr-defined]
    file_client = make_discovery(f"file:{tmp_path / 'd'}")
    assert isinstance(file_client, FileDiscovery) and file_client.directory == tmp_path / "d"
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path / "cache"))
    default_file = make_discovery("file")
    assert isinstance(default_file, FileDiscovery)
    assert default_file.directory == tmp_path / "cache" / "discovery"
    with pytest.raises(ValueError, match="unknown discovery spec"):
        make_discovery("zookeeper")


def test_make_discovery_etcd_specs() -> None:
    from tandem.runtime.discovery.etcd import EtcdDiscovery

    # Constructing connects to nothing (no etcd listens on these ports).
    by_url = make_discovery("etcd://127.0.0.1:2379")
    assert isinstance(by_url, EtcdDiscovery)
    assert by_url.endpoints == [("127.0.0.1", 2379)] and by_url.namespace == "tandem"
    assert by_url.prefix == b"/tandem/tandem/workers/"
    by_flag = make_discovery(
        "etcd", DiscoveryConfig(ttl_s=3.0), etcd_endpoints="10.0.0.1:2379,10.0.0.2:2390", namespace="prod"
    )
    assert isinstance(by_flag, EtcdDiscovery)
    assert by_flag.endpoints == [("10.0.0.1", 2379), ("10.0.0.2", 2390)] and by_flag.namespace == "prod"
    assert by_flag.config.ttl_s == 3.0 and by_flag.key("w1") == b"/tandem/prod/workers/w1"
    assert make_discovery("etcd").endpoints == [("127.0.0.1", 2379)]  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="etcd endpoint must be host:port"):
        make_discovery("etcd://nowhere")


def test_config_validation() -> None:
    assert DiscoveryConfig().ttl_s == 10.0
    for bad in (dict(ttl_s=0), dict(heartbeat_fraction=1.0), dict(poll_interval_s=-1)):
        with pytest.raises(ValueError):
            DiscoveryConfig(**bad)  # type: ignore[arg-type]
