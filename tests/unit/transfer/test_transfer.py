"""KV block transfer service over real sockets on 127.0.0.1: the store's release-exactly-once
contract, byte-exact pulls over TCP and shared memory (all blocks and subsets), path choice,
integrity failures (corruption, truncation, bad hashes, timeouts), hostile clients, shm segment
lifetime (no segment outlives its test), metrics, and the test-only fault hook
(TANDEM_FAULT_TRANSFER)."""

from __future__ import annotations

import asyncio
import inspect
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable

import msgspec
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from tests.support import run, wait_until

from tandem.engine.kv_transfer import export_to_tensor, tensor_to_export
from tandem.protocols.block_hash import block_hashes
from tandem.protocols.kv_export import KVBlockExport, verify_block_hashes
from tandem.transfer import (
    KvTransferServer,
    KvTransferServerConfig,
    PullAck,
    PullRequest,
    PullResponse,
    TransferError,
    TransferMetrics,
    TransferStore,
    TransferStoreConfig,
    host_id,
    pull_blocks,
    wire,
)
from tandem.transfer import client as client_module
from tandem.transfer import server as server_module
from tandem.transfer.shm import SEGMENT_PREFIX, attach_cache, list_segments
from tandem.transfer.wire import HEADER, HEADER_SIZE, decode_client_message, encode_message, payload_checksum

TEST_DEADLINE_S = 10.0
BLOCK = 16
NUM_BLOCKS = 6
BLOCK_SHAPE = [2, 2, BLOCK, 2, 4]  # 2,048 bytes per float32 block
BLOCK_BYTES = 2 * 2 * BLOCK * 2 * 4 * 4


def own_segments() -> set[str]:
    """This process's segments (names carry the creator's pid; other test runs may share /dev/shm)."""
    return {name for name in list_segments() if name.startswith(f"{SEGMENT_PREFIX}{os.getpid()}_")}


@pytest.fixture(autouse=True)
def no_leaked_segments():
    """Every test leaves /dev/shm as it found it (client mappings dropped too). A server unlinks
    a segment when the client's ack arrives, which on a loaded machine may be a moment after the
    test's last await: give it up to 2 s."""
    before = own_segments()
    yield
    attach_cache.clear()
    deadline = time.monotonic() + 2.0
    while own_segments() - before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert own_segments() - before == set()


def make_export(num_blocks: int = NUM_BLOCKS, first_token: int = 1000) -> KVBlockExport:
    tokens = list(range(first_token, first_token + num_blocks * BLOCK))
    return KVBlockExport(
        BLOCK,
        "float32",
        list(BLOCK_SHAPE),
        1337,
        block_hashes(tokens, BLOCK),
        tokens,
        os.urandom(num_blocks * BLOCK_BYTES),
    )


def blocks_of(export: KVBlockExport, indices: list[int]) -> bytes:
    return b"".join(export.data[i * BLOCK_BYTES : (i + 1) * BLOCK_BYTES] for i in indices)


class Served:
    """A store and a started server on 127.0.0.1 with a fresh metrics registry."""

    def __init__(self, config: KvTransferServerConfig | None = None, ttl_s: float = 60.0) -> None:
        self.registry = CollectorRegistry()
        self.metrics = TransferMetrics(self.registry)
        self.store = TransferStore(TransferStoreConfig(ttl_s=ttl_s), metrics=self.metrics)
        self.server = KvTransferServer(self.store, config=config, metrics=self.metrics)
        self.address = ""
        self.releases: list[tuple[str, str]] = []

    async def __aenter__(self) -> Served:
        self.address = await self.server.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.server.stop()
        self.store.close()

    def hold(self, transfer_id: str, export: KVBlockExport) -> None:
        self.store.hold(transfer_id, export, lambda tid, reason: self.releases.append((tid, reason)))

    async def pull(self, transfer_id: str, indices: list[int] | None = None, **kwargs):
        return await pull_blocks(self.address, transfer_id, indices, metrics=self.metrics, **kwargs)

    def sample(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


# --- store -----------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_store_releases_each_export_exactly_once_on_pull_expiry_cancel_and_double_release():
    clock, calls = FakeClock(), []
    store = TransferStore(TransferStoreConfig(ttl_s=10), clock=clock)
    for name in "abcd":
        store.hold(name, make_export(2), lambda tid, reason: calls.append((tid, reason)))
    assert store.stats().held == 4 and store.stats().held_bytes == 4 * 2 * BLOCK_BYTES
    assert store.release("a", "pulled") and not store.release("a", "pulled") and not store.release("a", "cancelled")
    assert store.release("b", "cancelled")
    clock.now = 9.9
    assert store.expire() == [] and store.get("c") is not None
    clock.now = 10.0
    assert store.get("c") is None  # get expires first
    assert not store.release("c", "pulled") and not store.release("d", "cancelled")
    assert store.expire() == []
    assert sorted(calls) == [("a", "pulled"), ("b", "cancelled"), ("c", "expired"), ("d", "expired")]
    stats = store.stats()
    assert (stats.held, stats.held_bytes, stats.pulled, stats.expired, stats.cancelled) == (0, 0, 1, 2, 1)


def test_store_refuses_bad_holds_without_calling_back_and_survives_a_failing_callback():
    store, calls = TransferStore(), []
    store.hold("x", make_export(), lambda tid, reason: calls.append(reason))
    with pytest.raises(ValueError, match="already held"):
        store.hold("x", make_export(), lambda tid, reason: calls.append("dup"))
    bad = make_export()
    bad.data = bad.data[:-1]
    with pytest.raises(ValueError, match="expected"):
        store.hold("y", bad, lambda tid, reason: calls.append("bad"))
    with pytest.raises(ValueError, match="release reason"):
        store.release("x", "done")

    def boom(tid: str, reason: str) -> None:
        raise RuntimeError("callback failed")

    store.hold("z", make_export(), boom)
    assert store.release("z", "pulled")  # the error is logged, the release still completes
    assert store.close() == ["x"] and calls == ["cancelled"] and len(store) == 0


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["hold", "get", "pulled", "cancelled", "tick", "expire"]), st.integers(0, 4)),
        max_size=40,
    )
)
def test_store_every_held_export_is_released_exactly_once_whatever_happens(ops):
    clock, released, holds = FakeClock(), [], 0
    store = TransferStore(TransferStoreConfig(ttl_s=3), clock=clock)
    for op, key in ops:
        tid = f"t{key}"
        if op == "hold" and tid not in store:
            serial = holds  # ids may be held again after their release: tell the holds apart
            store.hold(tid, make_export(1), lambda t, reason, serial=serial: released.append((serial, reason)))
            holds += 1
        elif op == "get":
            store.get(tid)
        elif op in ("pulled", "cancelled"):
            store.release(tid, op)
        elif op == "tick":
            clock.now += key
        elif op == "expire":
            store.expire()
    store.close()
    assert sorted(serial for serial, _ in released) == list(range(holds))
    stats = store.stats()
    assert (stats.held, stats.held_bytes) == (0, 0)
    assert [stats.pulled, stats.expired, stats.cancelled] == [
        sum(1 for _, reason in released if reason == r) for r in ("pulled", "expired", "cancelled")
    ]


# --- pulls over real sockets ---------------------------------------------------------------------


@pytest.mark.parametrize("path", ["tcp", "shm"])
@pytest.mark.parametrize("indices", [None, [2, 3, 4], [0, 1], [5, 1, 3]], ids=["all", "run", "prefix", "scattered"])
def test_pull_returns_the_held_bytes_exactly_and_releases_the_transfer(path, indices):
    async def body() -> None:
        async with Served() as served:
            export = make_export()
            served.hold("req-1", export)
            with await served.pull("req-1", indices, path=path) as pulled:
                wanted = list(range(NUM_BLOCKS)) if indices is None else indices
                assert pulled.path == path and pulled.block_indices == wanted
                assert bytes(pulled.payload) == blocks_of(export, wanted)
                assert bytes(pulled.block(1)) == blocks_of(export, [wanted[1]])
                tokens = [t for i in wanted for t in export.token_ids[i * BLOCK : (i + 1) * BLOCK]]
                assert pulled.header.token_ids == tokens
                assert pulled.header.block_hashes == [export.block_hashes[i] for i in wanted]
                assert pulled.payload.readonly
            await wait_until(lambda: served.releases == [("req-1", "pulled")])
            assert served.sample("tandem_kv_transfer_bytes_total", path=path) == len(blocks_of(export, wanted))
            assert served.sample("tandem_kv_transfer_seconds_count", path=path) == 1
            assert served.sample("tandem_kv_transfers_held") == 0

    run(body)


def test_full_pull_round_trips_to_an_importable_export():
    tokens = list(range(50, 50 + 3 * BLOCK))
    tensor = torch.randn(3, *BLOCK_SHAPE).to(torch.bfloat16)
    export = tensor_to_export(tensor, block_hashes(tokens, BLOCK), tokens, BLOCK, 1337)

    async def body() -> None:
        async with Served() as served:
            served.hold("bf16", export)
            with await served.pull("bf16") as pulled:
                rebuilt = pulled.to_export()
            verify_block_hashes(rebuilt)
            assert torch.equal(export_to_tensor(rebuilt, BLOCK_SHAPE, torch.bfloat16), tensor)

    run(body)


def test_a_run_past_block_0_becomes_an_export_that_continues_its_parent():
    tokens = list(range(50, 50 + 4 * BLOCK))
    tensor = torch.randn(4, *BLOCK_SHAPE)
    hashes = block_hashes(tokens, BLOCK)
    export = tensor_to_export(tensor, hashes, tokens, BLOCK, 1337)

    async def body() -> None:
        async with Served() as served:
            served.hold("tail", export)
            with await served.pull("tail", [2, 3]) as pulled:
                tail = pulled.to_export()
            assert tail.parent_hash == hashes[1] and tail.block_hashes == hashes[2:]
            verify_block_hashes(tail)  # the chain is checked from the parent
            assert torch.equal(export_to_tensor(tail, list(BLOCK_SHAPE), torch.float32), tensor[2:])
            served.hold("scattered", export)
            with await served.pull("scattered", [0, 2]) as pulled, pytest.raises(ValueError, match="contiguous"):
                pulled.to_export()

    run(body)


def test_payloadless_mocker_export_pulls_its_metadata_only():
    tokens = list(range(7, 7 + 2 * BLOCK))
    export = KVBlockExport(BLOCK, "float32", [0], 1337, block_hashes(tokens, BLOCK), tokens, b"")  # as MockerEngine

    async def body() -> None:
        async with Served() as served:
            served.hold("mock", export)
            with await served.pull("mock", path="shm") as pulled:
                assert pulled.nbytes == 0 and pulled.path == "tcp" and pulled.header.token_ids == tokens
                verify_block_hashes(pulled.to_export())
            await wait_until(lambda: served.releases == [("mock", "pulled")])

    run(body)


def test_auto_uses_shm_on_this_host_and_tcp_for_another_host(monkeypatch):
    async def body() -> None:
        async with Served() as served:
            for name in ("same", "other", "forced"):
                served.hold(name, make_export())
            with await served.pull("same") as pulled:
                assert pulled.path == "shm"
            monkeypatch.setattr(client_module, "host_id", lambda: "some-other-host")
            with await served.pull("other") as pulled:
                assert pulled.path == "tcp"
            with pytest.raises(TransferError, match="shared memory requested.*some-other-host") as info:
                await served.pull("forced", path="shm")
            assert info.value.reason == "server_error" and "forced" in served.store  # still held

    run(body)


def test_host_id_is_stable_and_shared_with_another_process():
    source = textwrap.dedent(inspect.getsource(wire._read_first_line)) + textwrap.dedent(
        inspect.getsource(host_id.__wrapped__)
    )
    script = "import functools, os, socket, uuid, xxhash\n" + source + "\nprint(host_id())\n"
    other = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=10, check=True)
    assert other.stdout.strip() == host_id() == host_id.__wrapped__()
    assert len(host_id()) == 16


def test_pooled_segment_is_reused_and_fresh_segments_are_unlinked_on_ack():
    async def pull_twice(served: Served) -> None:
        for name in ("a", "b"):
            served.hold(name, make_export())
            (await served.pull(name, path="shm")).close()
            await wait_until(lambda: name not in served.store)

    async def body() -> None:
        async with Served() as pooled, Served(KvTransferServerConfig(shm_pool_bytes=0)) as fresh:
            before = set(list_segments())
            await pull_twice(pooled)
            assert pooled.server.pool.created == 1  # the second pull reused the first one's segment
            kept = set(list_segments()) - before
            assert len(kept) == 1  # idle in the pool until stop
            await pull_twice(fresh)
            assert fresh.server.pool.created == 2
            assert set(list_segments()) - before == kept  # fresh segments were unlinked on ack

    run(body)


# --- integrity and failures ----------------------------------------------------------------------


class FakeServer:
    """Answers one pull with the bytes ``respond(request)`` returns, then records the client's messages."""

    def __init__(self, respond: Callable[[PullRequest], bytes], close_after_response: bool = False) -> None:
        self.respond = respond
        self.close_after_response = close_after_response
        self.received: list[object] = []
        self.address = ""
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> FakeServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                (length,) = HEADER.unpack(await reader.readexactly(HEADER_SIZE))
                message = decode_client_message(await reader.readexactly(length))
                self.received.append(message)
                if isinstance(message, PullRequest):
                    writer.write(self.respond(message))
                    await writer.drain()
                    if self.close_after_response:
                        break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # the client hung up, or the test ended first
        finally:
            writer.close()


def honest_response(export: KVBlockExport, payload: bytes | None = None) -> bytes:
    """A correct header for all of ``export``'s blocks, followed by ``payload`` (default: the real one)."""
    header = PullResponse(
        ok=True,
        transfer_id="t",
        dtype=export.dtype,
        block_shape=export.block_shape,
        block_size=BLOCK,
        hash_seed=export.hash_seed,
        block_indices=list(range(NUM_BLOCKS)),
        block_hashes=export.block_hashes,
        parent_hashes=[None, *export.block_hashes[:-1]],
        token_ids=export.token_ids,
        nbytes=len(export.data),
        checksum=payload_checksum(export.data),
    )
    return encode_message(header) + (export.data if payload is None else payload)


def flip_one_byte(data: bytes, position: int) -> bytes:
    return data[:position] + bytes([data[position] ^ 0x01]) + data[position + 1 :]


def test_corrupted_tcp_payload_raises_and_is_rejected_to_the_server():
    export = make_export()

    async def body() -> None:
        async with FakeServer(lambda req: honest_response(export, flip_one_byte(export.data, 777))) as fake:
            with pytest.raises(TransferError, match="corrupt: xxh3_64") as info:
                await pull_blocks(fake.address, "t", metrics=TransferMetrics(CollectorRegistry()))
            assert info.value.reason == "checksum"
            await wait_until(lambda: len(fake.received) == 2)
            ack = fake.received[1]
            assert isinstance(ack, PullAck) and not ack.ok and "corrupt" in ack.error

    run(body)


def test_truncated_payload_raises():
    export = make_export()

    async def body() -> None:
        half = export.data[: len(export.data) // 2]
        async with FakeServer(lambda req: honest_response(export, half), close_after_response=True) as fake:
            with pytest.raises(TransferError, match=f"closed after {len(half)} of {len(export.data)} payload") as info:
                await pull_blocks(fake.address, "t", metrics=TransferMetrics(CollectorRegistry()))
            assert info.value.reason == "truncated"

    run(body)


def test_wrong_sizes_and_hashes_in_the_header_raise():
    export = make_export()
    lying_size = make_export()
    lying_size.block_shape = [2, 2, BLOCK, 2, 2]  # announces half the bytes per block
    lying_hash = make_export()
    lying_hash.block_hashes = [*export.block_hashes[:-1], export.block_hashes[-1] ^ 1]
    lying_hash.data = export.data

    async def body() -> None:
        for lie, message, reason in (
            (lying_size, "announces", "size_mismatch"),
            (lying_hash, "block hashes do not match", "hash_mismatch"),
        ):
            async with FakeServer(lambda req, lie=lie: honest_response(lie)) as fake:
                with pytest.raises(TransferError, match=message) as info:
                    await pull_blocks(fake.address, "t", metrics=TransferMetrics(CollectorRegistry()))
                assert info.value.reason == reason

    run(body)


def test_corrupted_shm_payload_raises_and_the_transfer_stays_held_for_a_retry(monkeypatch):
    honest_copy = server_module._copy_and_hash

    def copy_then_corrupt(segment, runs):
        checksum = honest_copy(segment, runs)
        segment.buf[100] ^= 0xFF
        return checksum

    async def body() -> None:
        async with Served() as served:
            export = make_export()
            served.hold("retry-me", export)
            monkeypatch.setattr(server_module, "_copy_and_hash", copy_then_corrupt)
            with pytest.raises(TransferError, match="'retry-me'.*corrupt") as info:
                await served.pull("retry-me", path="shm")
            assert info.value.reason == "checksum"
            await wait_until(
                lambda: served.sample("tandem_kv_transfer_failures_total", side="server", reason="client_rejected") == 1
            )
            assert "retry-me" in served.store and served.releases == []
            assert served.sample("tandem_kv_transfer_failures_total", side="client", reason="checksum") == 1
            monkeypatch.setattr(server_module, "_copy_and_hash", honest_copy)
            with await served.pull("retry-me", path="shm") as pulled:
                assert bytes(pulled.payload) == export.data
            await wait_until(lambda: served.releases == [("retry-me", "pulled")])

    run(body)


def test_unknown_transfer_and_bad_indices_get_clear_errors():
    async def body() -> None:
        async with Served() as served:
            with pytest.raises(TransferError, match="unknown or expired transfer id 'no-such-request'") as info:
                await served.pull("no-such-request")
            assert info.value.reason == "server_error"
            served.hold("x", make_export())
            with pytest.raises(TransferError, match=r"block indices \[6\] out of range"):
                await served.pull("x", [1, 6])
            with pytest.raises(TransferError, match="unique"):
                await served.pull("x", [1, 1])
            assert "x" in served.store
            assert served.sample("tandem_kv_transfer_failures_total", side="server", reason="unknown_transfer") == 1
            assert served.sample("tandem_kv_transfer_failures_total", side="client", reason="server_error") == 3

    run(body)


def test_silent_server_times_out_and_refused_connection_fails():
    async def body() -> None:
        async with FakeServer(lambda req: b"") as fake:
            with pytest.raises(TransferError, match="timed out after 0.2s") as info:
                await pull_blocks(fake.address, "t", timeout_s=0.2, metrics=TransferMetrics(CollectorRegistry()))
            assert info.value.reason == "timeout"
        with pytest.raises(TransferError, match="failed") as info:
            await pull_blocks(fake.address, "t", metrics=TransferMetrics(CollectorRegistry()))
        assert info.value.reason == "connection"

    run(body)


# --- hostile clients and shm lifetime ------------------------------------------------------------


async def raw_exchange(address: str, data: bytes, read: bool = True) -> bytes:
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(data)
    await writer.drain()
    received = await reader.read() if read else b""
    writer.close()
    return received


def test_server_survives_garbage_and_still_serves():
    async def body() -> None:
        async with Served() as served:
            served.hold("ok", make_export())
            garbage = [
                b"\x00\x00\x00\x05hello",
                HEADER.pack(2**31) + b"x",
                encode_message(PullAck(ok=True)),
                HEADER.pack(3) + msgspec.msgpack.encode(["pull"])[:3],
                b"\xff" * 64,
            ]
            for data in garbage:
                assert await raw_exchange(served.address, data) == b""  # closed, no answer
            await raw_exchange(served.address, b"\x00\x00", read=False)  # half a header, then gone
            with await served.pull("ok") as pulled:
                assert pulled.nbytes == NUM_BLOCKS * BLOCK_BYTES
            bad_requests = served.sample("tandem_kv_transfer_failures_total", side="server", reason="bad_request")
            assert bad_requests == len(garbage)

    run(body)


def test_server_binds_only_the_given_host():
    async def body() -> None:
        async with Served() as served:
            assert served.address.startswith("127.0.0.1:")
            assert served.server._server.sockets[0].getsockname()[0] == "127.0.0.1"

    run(body)


def test_shm_segment_is_unlinked_when_the_client_vanishes_or_never_acks():
    async def body() -> None:
        config = KvTransferServerConfig(ack_timeout_s=0.2)
        async with Served(config) as served:
            served.hold("v", make_export())
            request = encode_message(PullRequest("v", None, host_id(), "shm"))
            host, port = served.address.rsplit(":", 1)
            for vanish in (True, False):
                reader, writer = await asyncio.open_connection(host, int(port))
                writer.write(request)
                (length,) = HEADER.unpack(await reader.readexactly(HEADER_SIZE))
                header = wire.decode_server_message(await reader.readexactly(length))
                assert header.path == "shm" and header.shm_name in list_segments()
                if vanish:
                    writer.close()
                else:
                    await asyncio.sleep(0.3)  # past the ack timeout
                await wait_until(lambda: header.shm_name not in list_segments())
                writer.close()
            assert "v" in served.store and served.releases == []  # never acknowledged: still held
            assert served.sample("tandem_kv_transfer_failures_total", side="server", reason="ack_timeout") == 1

    run(body)


def test_stop_unlinks_pool_and_cancels_held_and_expiry_runs_on_its_own():
    async def body() -> None:
        config = KvTransferServerConfig(expire_interval_s=0.05)
        async with Served(config, ttl_s=0.1) as served:
            served.hold("late", make_export())
            await wait_until(lambda: served.releases == [("late", "expired")])
            served.store.config = TransferStoreConfig(ttl_s=60)
            served.hold("kept", make_export())
            (await served.pull("kept", [0], path="shm")).close()
            await wait_until(lambda: "kept" not in served.store)
            served.hold("left", make_export())
            assert any(str(os.getpid()) in name for name in list_segments())  # the idle pooled segment
        assert not any(str(os.getpid()) in name for name in list_segments())
        assert served.releases == [("late", "expired"), ("kept", "pulled"), ("left", "cancelled")]

    run(body)


# --- fault injection (TANDEM_FAULT_TRANSFER, for tests only) -------------------------------------------


@pytest.mark.parametrize("path", ["tcp", "shm"])
@pytest.mark.parametrize("fault, reason", [("corrupt", "checksum"), ("truncate", "truncated")])
def test_fault_hook_corrupts_or_truncates_every_pull_and_the_client_detects_it(monkeypatch, path, fault, reason):
    monkeypatch.setenv("TANDEM_FAULT_TRANSFER", fault)

    async def body() -> None:
        async with Served() as served:
            export = make_export()
            served.hold("t", export)
            for _ in range(2):  # every pull, not just the first
                with pytest.raises(TransferError) as info:
                    await served.pull("t", path=path)
                assert info.value.reason == reason
            assert "t" in served.store and served.releases == []  # a failed pull leaves it held
            assert bytes(export.data) == bytes(served.store.get("t").data)  # the held copy is intact

    run(body)


def test_fault_hook_delays_the_pull_and_a_release_meanwhile_refuses_it(monkeypatch):
    monkeypatch.setenv("TANDEM_FAULT_TRANSFER", "delay:0.3")

    async def body() -> None:
        async with Served() as served:
            export = make_export()
            served.hold("slow", export)
            start = asyncio.get_running_loop().time()
            with await served.pull("slow") as pulled:
                assert bytes(pulled.payload) == export.data
            assert asyncio.get_running_loop().time() - start >= 0.3
            served.hold("gone", export)
            pull = asyncio.ensure_future(served.pull("gone"))
            await asyncio.sleep(0.1)
            served.store.release("gone", "cancelled")  # kv_release while the decode side waits
            with pytest.raises(TransferError, match="unknown or expired") as info:
                await pull
            assert info.value.reason == "server_error"

    run(body)


def test_fault_hook_is_off_by_default_and_a_file_switches_it_at_run_time(monkeypatch, tmp_path):
    monkeypatch.delenv("TANDEM_FAULT_TRANSFER", raising=False)
    assert KvTransferServer(TransferStore()).faults is None
    for bad in ("corupt", "delay:", "delay:-1", "delay:soon"):
        monkeypatch.setenv("TANDEM_FAULT_TRANSFER", bad)
        with pytest.raises(ValueError, match="TANDEM_FAULT_TRANSFER"):
            KvTransferServer(TransferStore())
    switch = tmp_path / "fault"
    monkeypatch.setenv("TANDEM_FAULT_TRANSFER", f"file:{switch}")

    async def body() -> None:
        async with Served() as served:
            export = make_export()
            for mode, fails in (("missing", False), ("corrupt", True), ("truncate", True), ("", False)):
                if mode != "missing":
                    switch.write_text(mode)
                served.hold(f"t-{mode}", export)
                if fails:
                    with pytest.raises(TransferError):
                        await served.pull(f"t-{mode}")
                    served.store.release(f"t-{mode}")
                else:
                    with await served.pull(f"t-{mode}") as pulled:
                        assert bytes(pulled.payload) == export.data

    run(body)
