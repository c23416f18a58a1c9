"""Worker lifecycle with mocker engines behind real sockets: the health probe, engine failure
(streams end with ``unavailable``, the card leaves discovery at once, the process is told to exit
non-zero), and graceful drain (grace, refusal, streams finished or ended with "worker drained;
migrate", a prefill worker waiting for its held KV exports)."""

from __future__ import annotations

import asyncio
import time

import pytest
from tests.support import run

from tandem.engine.async_engine import AsyncEngine, EngineDeadError, EngineStepError
from tandem.engine.faults import ENV_VAR, EngineFault, parse_engine_fault
from tandem.engine.mocker import MockerConfig, MockerEngine
from tandem.protocols.sampling_params import SamplingParams
from tandem.runtime.discovery.memory import MemoryDiscovery
from tandem.runtime.request_plane import RequestPlaneClient, WorkerUnavailableError
from tandem.worker.lifecycle import EXIT_ENGINE_FAILED, ShutdownConfig, serve_until_stopped
from tandem.worker.service import WorkerService

PROMPT = list(range(10, 60))  # 3 full blocks + 2 tokens
STEP_MS = 20.0  # every mocker step (prefill or decode) takes this long


def mocker_service(discovery: MemoryDiscovery, role: str = "agg", step_ms: float = STEP_MS) -> WorkerService:
    core = MockerEngine(
        MockerConfig(
            prefill_quadratic=0,
            prefill_linear=0,
            prefill_constant=step_ms,
            decode_quadratic=0,
            decode_linear=0,
            decode_constant=step_ms,
            kv_transfer_bandwidth_gbs=0,
        )
    )
    return WorkerService(
        AsyncEngine(core), discovery, model_name="m", tokenizer_source="m", role=role, engine_kind="mocker", ttl_s=30.0
    )


def payload(request_id: str, max_tokens: int, **extra) -> dict:
    return {
        "request_id": request_id,
        "token_ids": PROMPT,
        "sampling": {"max_tokens": max_tokens, "ignore_eos": True},
        **extra,
    }


async def count_tokens(client: RequestPlaneClient, address: str, body: dict) -> int:
    return sum([len(d["token_ids"]) async for d in client.stream(address, "generate", body)])


def test_health_reports_the_worker_and_its_load():
    async def scenario():
        discovery, client = MemoryDiscovery(), RequestPlaneClient()
        service = mocker_service(discovery)
        await service.start()
        try:
            address = service.server.address
            running = asyncio.create_task(count_tokens(client, address, payload("a", 40)))
            await asyncio.sleep(0.2)
            health = await client.call(address, "health", None)
            assert health["status"] == "ok" and health["engine_alive"] is True
            assert health["worker_id"] == service.worker_id and health["model"] == "m" and health["role"] == "agg"
            assert health["num_running"] == 1 and health["num_waiting"] == 0
            assert 0.1 < health["uptime_s"] < 10
            assert await running == 40
        finally:
            await client.close()
            await service.drain(timeout=1)
        assert service.status == "draining"

    run(scenario())


def test_engine_fault_spec_is_parsed_strictly():
    assert parse_engine_fault("") is None and parse_engine_fault("  ") is None
    assert parse_engine_fault("fail_after_steps:5") == EngineFault(5)
    for bad in ("fail_after_steps", "fail_after_steps:-1", "fail_after_steps:x", "crash"):
        with pytest.raises(ValueError, match=ENV_VAR):
            parse_engine_fault(bad)


def test_a_dead_engine_fails_streams_with_unavailable_withdraws_and_asks_to_exit(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "fail_after_steps:10")

    async def scenario():
        discovery, client = MemoryDiscovery(), RequestPlaneClient()
        service = mocker_service(discovery)
        monkeypatch.delenv(ENV_VAR)  # read once, at construction
        await service.start()
        stop = asyncio.Event()
        lifecycle = asyncio.create_task(serve_until_stopped([service], stop, ShutdownConfig(), announce=lambda _: None))
        try:
            assert len(await discovery.list("m")) == 1
            address = service.server.address
            streams = [asyncio.create_task(count_tokens(client, address, payload(f"r{i}", 100))) for i in range(3)]
            results = await asyncio.gather(*streams, return_exceptions=True)
            failed_at = time.monotonic()
            for result in results:  # the client maps code `unavailable` to WorkerUnavailableError
                assert isinstance(result, WorkerUnavailableError), result
                assert "engine failed" in str(result) and "injected fault" in str(result)
            await asyncio.wait_for(service.engine_failed.wait(), 2)
            assert await discovery.list("m") == []  # withdrawn at once, not after the 30 s TTL
            assert time.monotonic() - failed_at < 1.0
            assert await asyncio.wait_for(lifecycle, 5) == EXIT_ENGINE_FAILED
        finally:
            await client.close()
            if not lifecycle.done():
                lifecycle.cancel()

    run(scenario())


def test_a_dead_engine_reports_failed_health_and_refuses_new_requests(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "fail_after_steps:0")

    async def scenario():
        discovery, client = MemoryDiscovery(), RequestPlaneClient()
        service = mocker_service(discovery)
        await service.start()
        try:
            with pytest.raises(WorkerUnavailableError, match="engine failed"):
                await count_tokens(client, service.server.address, payload("a", 5))
            await asyncio.wait_for(service.engine_failed.wait(), 2)
            health = await client.call(service.server.address, "health", None)
            assert health["status"] == "failed" and health["engine_alive"] is False
            with pytest.raises(WorkerUnavailableError, match="engine failed"):
                await count_tokens(client, service.server.address, payload("b", 5))
        finally:
            await client.close()
            await service.drain(timeout=1)

    run(scenario())


class _BrokenMocker(MockerEngine):
    def step(self):
        raise RuntimeError("device lost")


def test_steps_failing_in_a_row_kill_the_engine():
    """One failed step fails only its requests; max_step_failures in a row declare the engine
    dead, and every later request or call is refused instead of hanging."""

    async def scenario():
        engine = AsyncEngine(_BrokenMocker(MockerConfig(speedup_ratio=0)), max_step_failures=2)
        params = SamplingParams(max_tokens=3)
        with pytest.raises(EngineStepError, match="engine step failed: device lost"):
            _ = [o async for o in engine.generate(PROMPT, params)]
        assert engine.is_running
        with pytest.raises(EngineDeadError, match="2 steps failed in a row"):
            _ = [o async for o in engine.generate(PROMPT, params)]
        cause = await asyncio.wait_for(engine.wait_stopped(), 2)
        assert "device lost" in str(cause) and engine.failure is cause and not engine.is_running
        with pytest.raises(EngineDeadError):
            _ = [o async for o in engine.generate(PROMPT, params)]
        with pytest.raises(EngineDeadError):
            await engine.call(lambda core: core.stats())
        engine.shutdown()

    run(scenario())


class _OnceBrokenMocker(MockerEngine):
    """Its third step raises (a transient device error); every other step works."""

    def step(self):
        self.steps_taken = getattr(self, "steps_taken", 0) + 1
        if self.steps_taken == 3:
            raise RuntimeError("transient device error")
        return super().step()


def test_a_failed_step_ends_its_streams_with_unavailable_so_the_frontend_migrates_them():
    """A step that raises (not yet fatal) aborts the step's requests; the worker sends them as
    ``unavailable`` (migrate), not as an internal error the client would see, and keeps serving."""

    async def scenario():
        discovery, client = MemoryDiscovery(), RequestPlaneClient()
        core = _OnceBrokenMocker(
            MockerConfig(
                prefill_quadratic=0,
                prefill_linear=0,
                prefill_constant=STEP_MS,
                decode_quadratic=0,
                decode_linear=0,
                decode_constant=STEP_MS,
            )
        )
        service = WorkerService(
            AsyncEngine(core), discovery, model_name="m", tokenizer_source="m", engine_kind="mocker", ttl_s=30.0
        )
        await service.start()
        try:
            with pytest.raises(WorkerUnavailableError, match="engine step failed: transient device error"):
                await count_tokens(client, service.server.address, payload("a", 20))
            assert await count_tokens(client, service.server.address, payload("b", 5)) == 5  # still serving
            assert len(await discovery.list("m")) == 1
        finally:
            await client.close()
            await service.drain(timeout=1)

    run(scenario())


def test_drain_keeps_accepting_for_the_grace_then_refuses_and_migrates_leftovers():
    async def scenario():
        discovery, client = MemoryDiscovery(), RequestPlaneClient()
        service = mocker_service(discovery)
        await service.start()
        address = service.server.address
        try:
            long = asyncio.create_task(count_tokens(client, address, payload("long", 1000)))  # ~20 s
            short = asyncio.create_task(count_tokens(client, address, payload("short", 20)))  # ~0.4 s
            await asyncio.sleep(0.1)
            draining = asyncio.create_task(service.drain(timeout=0.8, grace=0.5))
            await asyncio.sleep(0.05)
            assert await discovery.list("m") == []  # withdrawn first
            assert (await client.call(address, "health", None))["status"] == "draining"
            assert await count_tokens(client, address, payload("stale", 3)) == 3  # routed on a stale view
            await asyncio.sleep(0.5)
            with pytest.raises(WorkerUnavailableError, match="shutting down"):
                await count_tokens(client, address, payload("late", 3))
            assert await short == 20
            started = time.monotonic()
            with pytest.raises(WorkerUnavailableError, match="worker drained; migrate"):
                await long
            await asyncio.wait_for(draining, 3)
            assert time.monotonic() - started < 1.5
            assert not service.engine.is_running and service.engine.failure is None
        finally:
            await client.close()

    run(scenario())


def test_a_draining_prefill_worker_waits_for_its_held_exports():
    async def scenario():
        discovery, client = MemoryDiscovery(), RequestPlaneClient()
        service = mocker_service(discovery, role="prefill", step_ms=1.0)
        await service.start()
        address = service.server.address
        try:
            deltas = [d async for d in client.stream(address, "generate", payload("p1", 1, export_kv=True))]
            transfer = deltas[-1]["kv_transfer"]
            assert transfer["num_blocks"] == 3 and len(service.exporter.store) == 1
            started = time.monotonic()
            draining = asyncio.create_task(service.drain(timeout=5, grace=0))
            await asyncio.sleep(0.5)
            assert not draining.done()  # the export is still held: a decode worker may pull it
            assert (await client.call(address, "kv_release", {"transfer_id": transfer["transfer_id"]}))["released"]
            await asyncio.wait_for(draining, 2)
            assert 0.5 < time.monotonic() - started < 1.5
        finally:
            await client.close()

    run(scenario())
