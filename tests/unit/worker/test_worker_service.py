"""WorkerService: a real engine behind a real request-plane socket, registered in discovery."""

from __future__ import annotations

import asyncio

import pytest
from tests.support import run

from tandem.engine.async_engine import AsyncEngine
from tandem.engine.config import EngineConfig
from tandem.engine.llm_engine import LLMEngine
from tandem.protocols.sampling_params import SamplingParams
from tandem.runtime.discovery.memory import MemoryDiscovery
from tandem.runtime.request_plane import RemoteError, RequestPlaneClient, WorkerUnavailableError
from tandem.worker.service import WorkerService

PROMPT = list(range(10, 50))


async def started(loaded) -> tuple[WorkerService, MemoryDiscovery, RequestPlaneClient]:
    discovery = MemoryDiscovery()
    engine = AsyncEngine(LLMEngine(EngineConfig(num_kv_blocks=64), loaded=loaded))
    service = WorkerService(engine, discovery, model_name="tiny", tokenizer_source="tiny", ttl_s=2.0)
    await service.start()
    return service, discovery, RequestPlaneClient()


def test_generate_streams_the_engines_greedy_tokens_and_registers(tiny_loaded):
    expected = LLMEngine(EngineConfig(num_kv_blocks=64), loaded=tiny_loaded).generate(
        [PROMPT], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    )[0]

    async def scenario():
        service, discovery, client = await started(tiny_loaded)
        try:
            (card,) = await discovery.list("tiny")
            assert card.request_plane_address == service.server.address and card.block_size == 16
            payload = {
                "request_id": "a",
                "token_ids": PROMPT,
                "sampling": {"max_tokens": 6, "temperature": 0.0, "ignore_eos": True},
            }
            deltas = [d async for d in client.stream(card.request_plane_address, "generate", payload)]
            assert [t for d in deltas for t in d["token_ids"]] == expected
            assert deltas[-1]["finish_reason"] == "length" and deltas[-1]["num_prompt_tokens"] == len(PROMPT)
        finally:
            await client.close()
            await service.drain(timeout=1)
        assert await discovery.list() == []

    run(scenario())


def test_bad_payloads_get_bad_request_and_the_worker_keeps_serving(tiny_loaded):
    async def scenario():
        service, _, client = await started(tiny_loaded)
        addr = service.server.address
        try:
            for bad in (
                {"token_ids": PROMPT},
                {"request_id": "x", "token_ids": []},
                {"request_id": "x", "token_ids": PROMPT, "sampling": {"temperature": -1}},
                {"request_id": "x", "token_ids": PROMPT, "sampling": {"bogus": 1}},
                {"request_id": "x", "token_ids": [10**9]},
            ):
                with pytest.raises(RemoteError) as err:
                    _ = [d async for d in client.stream(addr, "generate", bad)]
                assert err.value.code == "bad_request"
            ok = {"request_id": "y", "token_ids": PROMPT, "sampling": {"max_tokens": 2, "temperature": 0.0}}
            assert len([d async for d in client.stream(addr, "generate", ok)]) >= 1
        finally:
            await client.close()
            await service.drain(timeout=1)

    run(scenario())


def test_client_leaving_early_frees_the_requests_blocks(tiny_loaded):
    async def scenario():
        service, _, client = await started(tiny_loaded)
        addr = service.server.address
        try:
            payload = {
                "request_id": "long",
                "token_ids": PROMPT,
                "sampling": {"max_tokens": 400, "temperature": 0.0, "ignore_eos": True},
            }
            stream = client.stream(addr, "generate", payload)
            async for delta in stream:
                if delta["num_output_tokens"] >= 3:
                    break
            await stream.aclose()
            for _ in range(200):
                stats = await client.call(addr, "stats", {})
                if stats["num_running"] == 0 and stats["kv_usage"] == 0.0:
                    break
                await asyncio.sleep(0.02)
            assert stats["num_running"] == 0 and stats["kv_usage"] == 0.0
        finally:
            await client.close()
            await service.drain(timeout=1)

    run(scenario())


def test_drained_worker_is_unavailable(tiny_loaded):
    async def scenario():
        service, _, client = await started(tiny_loaded)
        addr = service.server.address
        await service.drain(timeout=1)
        with pytest.raises(WorkerUnavailableError):
            await client.call(addr, "stats", {})
        await client.close()

    run(scenario())


def test_a_request_validates_its_prompt_once(tiny_loaded, monkeypatch):
    calls = []
    original = LLMEngine.validate_prompt

    def counted(self, prompt_token_ids):
        calls.append(len(prompt_token_ids))
        return original(self, prompt_token_ids)

    monkeypatch.setattr(LLMEngine, "validate_prompt", counted)

    async def scenario():
        service, discovery, client = await started(tiny_loaded)
        try:
            payload = {
                "request_id": "once",
                "token_ids": PROMPT,
                "sampling": {"max_tokens": 2, "temperature": 0.0, "ignore_eos": True},
            }
            deltas = [d async for d in client.stream(service.server.address, "generate", payload)]
            assert deltas[-1]["finish_reason"] == "length"
            bad = {"request_id": "bad", "token_ids": [10**9], "sampling": {"max_tokens": 2}}
            with pytest.raises(RemoteError, match="token ids must be in"):
                [d async for d in client.stream(service.server.address, "generate", bad)]
        finally:
            await client.close()
            await service.drain(timeout=1)

    run(scenario())
    assert calls == [len(PROMPT), 1]  # the worker checks once; the engine thread trusts it


def test_the_engine_alone_validates_on_its_own_thread(tiny_loaded):
    async def scenario():
        engine = AsyncEngine(LLMEngine(EngineConfig(num_kv_blocks=64), loaded=tiny_loaded))
        try:
            with pytest.raises(ValueError, match="at least one token"):
                [out async for out in engine.generate([], SamplingParams(max_tokens=2))]
        finally:
            engine.shutdown()

    run(scenario())
