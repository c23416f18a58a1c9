"""Disaggregation on the worker side: a prefill worker holds its prompt's KV, a decode worker pulls
the blocks it lacks and continues; greedy output equals the aggregated engine's, a failed
transfer falls back to local prefill with the same output, and a client that leaves during the
prefill, after the first token or during the KV pull leaves nothing behind on either worker."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from dataclasses import dataclass

import pytest

from tandem.engine.async_engine import AsyncEngine
from tandem.engine.config import EngineConfig
from tandem.engine.llm_engine import LLMEngine
from tandem.protocols.sampling_params import SamplingParams
from tandem.runtime.discovery.memory import MemoryDiscovery
from tandem.runtime.request_plane import RemoteError, RequestPlaneClient
from tandem.worker.service import WorkerService

PROMPT = list(range(10, 60))  # 3 full blocks + 2 tokens
MAX_TOKENS = 6


def _service(loaded, discovery: MemoryDiscovery, role: str, **engine_config) -> WorkerService:
    engine = AsyncEngine(LLMEngine(EngineConfig(num_kv_blocks=64, **engine_config), loaded=loaded))
    return WorkerService(engine, discovery, model_name="tiny", tokenizer_source="tiny", role=role, ttl_s=2.0)


def _sampling(max_tokens: int) -> dict:
    return {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}


async def _collect(client: RequestPlaneClient, address: str, payload: dict) -> list[dict]:
    return [d async for d in client.stream(address, "generate", payload)]


def _disagg(loaded, prefix_on_decode: list[int] | None = None, break_transfer: bool = False):
    """Run PROMPT prefill → decode; returns (tokens, decode's cached tokens, blocks the decode worker
    imported, prefill's held count)."""

    async def scenario():
        discovery, client = MemoryDiscovery(), RequestPlaneClient()
        prefill, decode = _service(loaded, discovery, "prefill"), _service(loaded, discovery, "decode")
        await prefill.start()
        await decode.start()
        try:
            if prefix_on_decode:  # the decode worker already holds part of the prompt
                await _collect(
                    client,
                    decode.server.address,
                    {"request_id": "warm", "token_ids": prefix_on_decode, "sampling": _sampling(1)},
                )
            first = await _collect(
                client,
                prefill.server.address,
                {"request_id": "p", "token_ids": PROMPT, "sampling": _sampling(1), "export_kv": True},
            )
            params = first[-1]["kv_transfer"]
            assert params["num_blocks"] == len(PROMPT) // 16 and prefill.exporter.store.stats().held == 1
            if break_transfer:
                params = {**params, "transfer_id": "no-such-transfer"}
            first_token = first[-1]["token_ids"][-1]
            rest = await _collect(
                client,
                decode.server.address,
                {
                    "request_id": "d",
                    "token_ids": PROMPT + [first_token],
                    "sampling": _sampling(MAX_TOKENS - 1),
                    "kv_transfer": params,
                },
            )
            tokens = [first_token] + [t for d in rest for t in d["token_ids"]]
            return (
                tokens,
                rest[-1].get("num_cached_tokens", 0),
                decode.kv_blocks_imported,
                prefill.exporter.store.stats().held,
            )
        finally:
            await client.close()
            await prefill.drain(timeout=1)
            await decode.drain(timeout=1)

    return asyncio.run(asyncio.wait_for(scenario(), 60))


@pytest.fixture(scope="module")
def aggregated(tiny_loaded) -> list[int]:
    engine = LLMEngine(EngineConfig(num_kv_blocks=64), loaded=tiny_loaded)
    return engine.generate([PROMPT], SamplingParams(**_sampling(MAX_TOKENS)))[0]


def test_decode_continues_from_the_pulled_blocks_with_the_aggregated_output(tiny_loaded, aggregated):
    tokens, cached, imported, held = _disagg(tiny_loaded)
    assert tokens == aggregated
    assert cached == 48 and imported == 3  # all three full blocks came from the prefill worker
    assert held == 0  # pulled, so released


def test_decode_pulls_only_the_blocks_it_lacks(tiny_loaded, aggregated):
    tokens, cached, imported, held = _disagg(tiny_loaded, prefix_on_decode=PROMPT[:33])  # holds blocks 0-1
    assert tokens == aggregated and cached == 48 and held == 0
    assert imported == 1  # block 2 only


def test_a_failed_transfer_falls_back_to_local_prefill(tiny_loaded, aggregated):
    tokens, cached, imported, held = _disagg(tiny_loaded, break_transfer=True)
    assert tokens == aggregated
    assert cached == imported == 0  # nothing imported: the decode worker prefilled everything
    assert held == 1  # the real transfer was never pulled (it expires, or kv_release frees it)


def test_export_kv_on_a_non_prefill_worker_is_a_bad_request(tiny_loaded):
    async def scenario():
        discovery, client = MemoryDiscovery(), RequestPlaneClient()
        agg = _service(tiny_loaded, discovery, "agg")
        await agg.start()
        try:
            with pytest.raises(RemoteError) as err:
                await _collect(
                    client,
                    agg.server.address,
                    {"request_id": "x", "token_ids": PROMPT, "sampling": _sampling(1), "export_kv": True},
                )
            assert err.value.code == "bad_request"
            assert await client.call(agg.server.address, "kv_release", {"transfer_id": "x"}) == {"released": False}
        finally:
            await client.close()
            await agg.drain(timeout=1)

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_kv_release_frees_a_held_export(tiny_loaded):
    async def scenario():
        discovery, client = MemoryDiscovery(), RequestPlaneClient()
        prefill = _service(tiny_loaded, discovery, "prefill")
        await prefill.start()
        try:
            first = await _collect(
                client,
                prefill.server.address,
                {"request_id": "p", "token_ids": PROMPT, "sampling": _sampling(1), "export_kv": True},
            )
            transfer_id = first[-1]["kv_transfer"]["transfer_id"]
            assert await client.call(prefill.server.address, "kv_release", {"transfer_id": transfer_id}) == {
                "released": True
            }
            assert prefill.exporter.store.stats().held == 0
        finally:
            await client.close()
            await prefill.drain(timeout=1)

    asyncio.run(asyncio.wait_for(scenario(), 60))


# --- the frontend's two-halves flow (DisaggregatedClient) over real worker sockets ---

LONG_PROMPT = list(range(10, 110))  # 6 full blocks + 4 tokens: above max_local_prefill_length 64


def _frontend_flow(
    loaded,
    roles: tuple[str, ...],
    max_tokens: int,
    lose_prefill: bool = False,
    router: str = "round-robin",
    prefills_already_in_flight: int = 0,
    warm_decode: bool = False,
):
    """Generate LONG_PROMPT through DisaggregatedClient over workers with ``roles``; returns
    (tokens, the last delta, the client, the prefill workers' held exports). ``warm_decode``: the
    decode worker has run the prompt before. The client also gets ``outcomes`` and ``imported``
    (blocks each decode worker imported)."""
    from tandem.protocols.endpoints import GenerateRequest
    from tandem.router.dispatch.prefill_router import DisaggConfig, DisaggregatedClient
    from tandem.router.dispatch.worker_client import WorkerClient
    from tandem.router.registry import build_policy
    from tandem.router.worker_pool import WorkerPool

    async def scenario():
        discovery, client = MemoryDiscovery(), RequestPlaneClient()
        services = [_service(loaded, discovery, role) for role in roles]
        for service in services:
            await service.start()
        pool = WorkerPool(discovery)
        await pool.start()
        outcomes: list[str] = []
        flow = DisaggregatedClient(
            WorkerClient(pool, build_policy(router, pool, client), client),
            DisaggConfig(max_prefill_queue_size=2),
            on_outcome=lambda model, outcome: outcomes.append(outcome),
        )
        flow.outcomes = outcomes
        flow.prefills_in_flight["tiny"] = prefills_already_in_flight
        try:
            if lose_prefill:  # a prefill worker that is registered but does not answer
                prefill = next(s for s in services if s.role == "prefill")
                await prefill.server.stop(drain_timeout=0)
            if warm_decode:
                decode = next(s for s in services if s.role == "decode")
                await _collect(
                    client,
                    decode.server.address,
                    {"request_id": "warm", "token_ids": LONG_PROMPT, "sampling": _sampling(1)},
                )
            request = GenerateRequest("r", LONG_PROMPT, _sampling(max_tokens))
            deltas = [d async for d in flow.generate("tiny", request)]
            await asyncio.sleep(0.1)  # a best-effort kv_release runs in the background
            flow.imported = [s.kv_blocks_imported for s in services if s.role == "decode"]
            held = [s.exporter.store.stats().held for s in services if s.exporter is not None and not lose_prefill]
            return [t for d in deltas for t in d.token_ids], deltas[-1], flow, held
        finally:
            await pool.stop()
            await client.close()
            for service in services:
                await service.drain(timeout=1)

    return asyncio.run(asyncio.wait_for(scenario(), 60))


@pytest.fixture(scope="module")
def aggregated_long(tiny_loaded) -> list[int]:
    engine = LLMEngine(EngineConfig(num_kv_blocks=64), loaded=tiny_loaded)
    return engine.generate([LONG_PROMPT], SamplingParams(**_sampling(MAX_TOKENS)))[0]


@pytest.mark.parametrize("router", ["round-robin", "kv"])
def test_frontend_flow_prefills_then_decodes_with_the_aggregated_output(tiny_loaded, aggregated_long, router):
    tokens, last, flow, held = _frontend_flow(tiny_loaded, ("prefill", "decode"), MAX_TOKENS, router=router)
    assert tokens == aggregated_long
    assert flow.disaggregated_total == 1 and flow.fallbacks_total == 0
    # Usage in the whole request's terms: the prefill's token is output, not prompt.
    assert (last.num_prompt_tokens, last.num_output_tokens, last.finish_reason) == (
        len(LONG_PROMPT),
        MAX_TOKENS,
        "length",
    )
    assert held == [0]  # pulled


def test_frontend_flow_without_prefill_workers_runs_on_the_decode_worker(tiny_loaded, aggregated_long):
    tokens, _, flow, _ = _frontend_flow(tiny_loaded, ("decode",), MAX_TOKENS)
    assert tokens == aggregated_long and flow.disaggregated_total == flow.fallbacks_total == 0
    assert flow.outcomes == []


@pytest.mark.parametrize("in_flight, outcome", [(1, "disaggregated"), (2, "local_busy")])
def test_frontend_flow_prefills_locally_when_every_prefill_worker_is_busy(
    tiny_loaded, aggregated_long, in_flight, outcome
):
    # max_prefill_queue_size 2 with one prefill worker: a third prefill in flight would queue.
    tokens, _, flow, held = _frontend_flow(
        tiny_loaded, ("prefill", "decode"), MAX_TOKENS, prefills_already_in_flight=in_flight
    )
    assert tokens == aggregated_long and flow.outcomes == [outcome]
    assert flow.prefills_in_flight["tiny"] == in_flight  # the count is restored after the prefill half
    assert held == [0]


def test_frontend_flow_falls_back_when_the_prefill_worker_does_not_answer(tiny_loaded, aggregated_long):
    tokens, _, flow, _ = _frontend_flow(tiny_loaded, ("prefill", "decode"), MAX_TOKENS, lose_prefill=True)
    assert tokens == aggregated_long and flow.fallbacks_total == 1 and flow.outcomes == ["fallback"]


def test_a_one_token_request_ends_at_the_prefill_and_frees_its_blocks(tiny_loaded, aggregated_long):
    tokens, last, flow, held = _frontend_flow(tiny_loaded, ("prefill", "decode"), 1)
    assert tokens == aggregated_long[:1] and last.finish_reason == "length"
    assert held == [0]  # released with kv_release, not left to expire


def test_a_failed_kv_pull_prefills_locally_and_the_export_is_released(tiny_loaded, aggregated_long, monkeypatch):
    monkeypatch.setenv("TANDEM_FAULT_TRANSFER", "corrupt")  # every pull fails its checksum
    tokens, _, flow, held = _frontend_flow(tiny_loaded, ("prefill", "decode"), MAX_TOKENS)
    assert tokens == aggregated_long and flow.outcomes == ["disaggregated"]
    assert flow.imported == [0]  # the pull failed: the decode worker prefilled the prompt itself
    assert held == [0]  # released with kv_release, not left to expire


def test_a_decode_worker_holding_the_whole_prompt_pulls_nothing_and_the_export_is_released(
    tiny_loaded, aggregated_long
):
    tokens, _, flow, held = _frontend_flow(tiny_loaded, ("prefill", "decode"), MAX_TOKENS, warm_decode=True)
    assert tokens == aggregated_long and flow.outcomes == ["disaggregated"]
    assert flow.imported == [0]  # every block was cached already: nothing to pull
    assert held == [0]


# --- a client that leaves mid-flow leaves nothing behind on either worker ---


async def _leftovers(client: RequestPlaneClient, service: WorkerService) -> dict:
    """What the worker still holds for requests, from its ``stats`` endpoint and its engine."""
    stats = await client.call(service.server.address, "stats", {})
    return {
        "engine_requests": len(service.engine.core.requests),
        "running": stats["num_running"],
        "waiting": stats["num_waiting"],
        "kv_usage": stats["kv_usage"],
        "exports_held": stats["kv_exports_held"],
    }


async def _until_nothing_left(
    client: RequestPlaneClient, services: list[WorkerService], timeout_s: float = 5.0
) -> list[dict]:
    nothing = {"engine_requests": 0, "running": 0, "waiting": 0, "kv_usage": 0.0, "exports_held": 0}
    deadline = time.monotonic() + timeout_s
    while True:
        left = [await _leftovers(client, service) for service in services]
        if all(each == nothing for each in left) or time.monotonic() > deadline:
            return left
        await asyncio.sleep(0.02)


@dataclass
class Abandoned:
    """What an abandoned request left behind (see `_abandoned_flow`)."""

    left: list[dict]
    """`_leftovers` of [prefill worker, decode worker] once they settled."""
    prefill_generated: int
    """Tokens the prefill worker's engine generated (1 once the prefill finished)."""
    decode_prompt_tokens: int
    """Prompt tokens the decode worker's engine ran (0: the decode half never started)."""
    imported: int
    """Blocks the decode worker imported."""
    engines_alive: list[bool]
    """Whether each worker's engine thread still runs."""
    import_errors: list[str]
    """What the decode engine's KV imports raised."""


def _abandoned_flow(loaded, monkeypatch, stage: str) -> Abandoned:
    """Start LONG_PROMPT through DisaggregatedClient (prefill + decode worker) and abandon it at
    ``stage``: "prefill" (the prefill worker is part-way through a chunked prefill), "first_token"
    (the client closes the stream on the first token, before the decode half starts), "transfer"
    (the decode worker is pulling the blocks; the transfer server delays the pull), "export" (the
    prefill worker's engine is exporting the finished prompt's blocks) or "import" (the decode
    worker's engine is importing the pulled blocks, and then the frontend's connection drops too)."""
    from tandem.protocols.endpoints import GenerateRequest
    from tandem.router.dispatch.prefill_router import DisaggConfig, DisaggregatedClient
    from tandem.router.dispatch.worker_client import WorkerClient
    from tandem.router.registry import build_policy
    from tandem.router.worker_pool import WorkerPool
    from tandem.worker import disagg as worker_disagg

    if stage == "transfer":
        monkeypatch.setenv("TANDEM_FAULT_TRANSFER", "delay:5")  # read by the prefill worker's transfer server
    pulling, exporting, importing = asyncio.Event(), threading.Event(), threading.Event()
    import_errors: list[str] = []
    real_pull = worker_disagg.pull_blocks

    async def watched_pull(*args, **kwargs):
        pulling.set()
        return await real_pull(*args, **kwargs)

    monkeypatch.setattr(worker_disagg, "pull_blocks", watched_pull)

    async def scenario():
        discovery, client, stats_client = MemoryDiscovery(), RequestPlaneClient(), RequestPlaneClient()
        # 16-token steps: LONG_PROMPT's prefill takes 7 steps, slowed so the client can leave mid-way.
        prefill = _service(loaded, discovery, "prefill", max_num_batched_tokens=16)
        decode = _service(loaded, discovery, "decode")
        core, real_step, steps = prefill.engine.core, prefill.engine.core.step, []
        real_export, real_import = core.export_kv, decode.engine.core.import_kv

        def slow_step():
            outputs = real_step()
            steps.append(len(outputs))
            time.sleep(0.05)
            return outputs

        def slow_export(*args):
            exporting.set()
            time.sleep(0.5)
            return real_export(*args)

        def slow_import(export):
            importing.set()
            time.sleep(0.5)
            try:
                return real_import(export)
            except Exception as exc:
                import_errors.append(repr(exc))
                raise

        core.step, core.export_kv, decode.engine.core.import_kv = slow_step, slow_export, slow_import
        for service in (prefill, decode):
            await service.start()
        pool = WorkerPool(discovery)
        await pool.start()
        flow = DisaggregatedClient(
            WorkerClient(pool, build_policy("round-robin", pool, client), client), DisaggConfig()
        )
        deltas = flow.generate("tiny", GenerateRequest("r", LONG_PROMPT, _sampling(MAX_TOKENS)))
        first_token = asyncio.Event()

        async def consume():
            async for _ in deltas:
                first_token.set()
                if stage == "first_token":
                    await deltas.aclose()  # the client leaves on the first token
                    return

        task = asyncio.create_task(consume())
        try:
            if stage == "prefill":
                while len(steps) < 2:  # part-way through the prefill
                    await asyncio.sleep(0.005)
                assert not first_token.is_set()
            elif stage == "transfer":
                await pulling.wait()
                await asyncio.sleep(0.1)  # the pull is connected and waiting on the delayed server
            elif stage in ("export", "import"):
                while not (exporting if stage == "export" else importing).is_set():
                    await asyncio.sleep(0.005)
            await (task if stage == "first_token" else asyncio.sleep(0))
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if stage == "import":
                await asyncio.sleep(0.1)  # the decode worker's handler now waits for the import...
                await client.close()  # ...when the frontend goes away too: its streams are cancelled once more
            await asyncio.sleep(0.6)  # past the slowed export/import
            left = await _until_nothing_left(stats_client, [prefill, decode])
            return Abandoned(
                left,
                prefill.engine.stats().generation_tokens_total,
                decode.engine.stats().prompt_tokens_total,
                decode.kv_blocks_imported,
                [prefill.engine.is_running, decode.engine.is_running],
                import_errors,
            )
        finally:
            await pool.stop()
            await client.close()
            await stats_client.close()
            for service in (prefill, decode):
                await service.drain(timeout=1)

    return asyncio.run(asyncio.wait_for(scenario(), 60))


NOTHING_LEFT = {"engine_requests": 0, "running": 0, "waiting": 0, "kv_usage": 0.0, "exports_held": 0}


def test_a_client_leaving_during_the_prefill_leaves_nothing_on_either_worker(tiny_loaded, monkeypatch):
    result = _abandoned_flow(tiny_loaded, monkeypatch, "prefill")
    assert result.left == [NOTHING_LEFT, NOTHING_LEFT]
    assert result.prefill_generated == 0  # aborted before its one token: the prefill really was cut short
    assert result.decode_prompt_tokens == 0 and result.imported == 0  # the decode half never started
    assert result.engines_alive == [True, True]


def test_a_client_leaving_on_the_first_token_frees_the_held_export(tiny_loaded, monkeypatch):
    result = _abandoned_flow(tiny_loaded, monkeypatch, "first_token")
    assert result.left == [NOTHING_LEFT, NOTHING_LEFT]  # the export was released (kv_release), not left to expire
    assert result.prefill_generated == 1 and result.decode_prompt_tokens == 0 and result.imported == 0


def test_a_client_leaving_during_the_kv_pull_leaves_nothing_on_either_worker(tiny_loaded, monkeypatch):
    result = _abandoned_flow(tiny_loaded, monkeypatch, "transfer")
    assert result.left == [NOTHING_LEFT, NOTHING_LEFT]  # the pull was abandoned and the export released
    assert result.prefill_generated == 1  # the prefill finished and exported its blocks
    assert result.imported == 0 and result.decode_prompt_tokens == 0  # left before the pull completed
    assert result.engines_alive == [True, True]


def _serving_again(monkeypatch) -> list[list[int] | str]:
    """Make `_abandoned_flow`, once both workers settled, send LONG_PROMPT (greedy, MAX_TOKENS)
    straight to the prefill worker, then to the decode worker; returns each one's tokens (or the
    error it answered with)."""
    settle, served = _until_nothing_left, []

    async def settle_then_serve(
        client: RequestPlaneClient, services: list[WorkerService], timeout_s: float = 5.0
    ) -> list[dict]:
        left = await settle(client, services, timeout_s)
        for service in services:
            try:
                deltas = await asyncio.wait_for(
                    _collect(
                        client,
                        service.server.address,
                        {"request_id": "again", "token_ids": LONG_PROMPT, "sampling": _sampling(MAX_TOKENS)},
                    ),
                    5,
                )
                served.append([t for d in deltas for t in d["token_ids"]])
            except (RemoteError, TimeoutError) as exc:
                served.append(repr(exc))
        return left

    monkeypatch.setitem(globals(), "_until_nothing_left", settle_then_serve)
    return served


def test_a_client_leaving_while_the_prefill_worker_exports_keeps_its_engine_alive(
    tiny_loaded, monkeypatch, aggregated_long
):
    # The engine thread is inside export_kv (slowed) when the prefill worker's handler is
    # cancelled: the cancelled call's future must not kill the thread that still completes it.
    served = _serving_again(monkeypatch)
    result = _abandoned_flow(tiny_loaded, monkeypatch, "export")
    assert result.engines_alive == [True, True]
    assert result.left == [NOTHING_LEFT, NOTHING_LEFT]  # the export was never held (or was released)
    # Counted after the request served again: the prefill's one token, then MAX_TOKENS; on the decode
    # worker only the request served again ran (the decode half never started).
    assert result.prefill_generated == 1 + MAX_TOKENS
    assert result.decode_prompt_tokens == len(LONG_PROMPT) and result.imported == 0
    assert served == [aggregated_long, aggregated_long]  # both workers still serve, greedy as aggregated


def test_an_engine_call_cancelled_before_it_ran_is_skipped_and_the_engine_lives_on(tiny_loaded):
    async def scenario():
        engine = AsyncEngine(LLMEngine(EngineConfig(num_kv_blocks=64), loaded=tiny_loaded))
        entered, release, ran = threading.Event(), threading.Event(), []
        try:

            def block(core):
                entered.set()
                return release.wait(5)

            blocking = asyncio.create_task(engine.call(block))
            abandoned = asyncio.create_task(engine.call(lambda core: ran.append("abandoned")))
            assert await asyncio.to_thread(entered.wait, 5)  # both posted; the engine thread runs the first
            abandoned.cancel()  # cancelled while still in the inbox
            with contextlib.suppress(asyncio.CancelledError):
                await abandoned
            release.set()
            assert await asyncio.wait_for(blocking, 5) is True
            # The engine thread skipped the cancelled call and still serves the next one.
            assert await asyncio.wait_for(engine.call(lambda core: core.num_cached_prompt_blocks(PROMPT, None)), 2) == 0
            assert ran == [] and engine.is_running
        finally:
            release.set()
            await asyncio.to_thread(engine.shutdown, 2)

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_a_pull_cancelled_twice_is_not_released_under_the_engines_import(tiny_loaded, monkeypatch):
    from tandem.protocols.endpoints import KvTransferParams
    from tandem.worker import disagg as worker_disagg

    async def scenario():
        discovery, client = MemoryDiscovery(), RequestPlaneClient()
        prefill, decode = _service(tiny_loaded, discovery, "prefill"), _service(tiny_loaded, discovery, "decode")
        core = decode.engine.core
        real_import, real_pull = core.import_kv, worker_disagg.pull_blocks
        importing, imported, outcome, pulls = threading.Event(), threading.Event(), [], []

        def slow_import(export):  # on the engine thread, reading the pulled payload in place
            importing.set()
            time.sleep(0.3)
            try:
                outcome.append(real_import(export))
            except Exception as exc:
                outcome.append(repr(exc))
                raise
            finally:
                imported.set()

        async def recorded_pull(*args, **kwargs):
            pulls.append(await real_pull(*args, **kwargs))
            return pulls[-1]

        core.import_kv = slow_import
        monkeypatch.setattr(worker_disagg, "pull_blocks", recorded_pull)
        await prefill.start()
        await decode.start()
        try:
            first = await _collect(
                client,
                prefill.server.address,
                {"request_id": "p", "token_ids": PROMPT, "sampling": _sampling(1), "export_kv": True},
            )
            params = KvTransferParams(**first[-1]["kv_transfer"])
            task = asyncio.create_task(worker_disagg.import_missing_blocks(decode.engine, PROMPT, None, params))
            assert await asyncio.to_thread(importing.wait, 5)
            task.cancel()  # the request is cancelled while the engine imports...
            await asyncio.sleep(0.05)
            task.cancel()  # ...and once more (its connection dropped too)
            with contextlib.suppress(asyncio.CancelledError):
                await task
            assert task.cancelled()
            assert await asyncio.to_thread(imported.wait, 5)
            await asyncio.sleep(0.05)  # the payload is released right after the import's call finished
            assert outcome == [3]  # the engine read the whole payload: no "released memoryview" error
            assert await decode.engine.call(lambda core: core.num_cached_prompt_blocks(PROMPT, None)) == 3
            assert decode.engine.is_running
            (pulled,) = pulls
            with pytest.raises(ValueError, match="released memoryview"):
                pulled.payload.tobytes()  # released once the import was done: nothing leaks
            assert prefill.exporter.store.stats().held == 0  # pulled, so released
            assert await _until_nothing_left(client, [prefill, decode]) == [NOTHING_LEFT, NOTHING_LEFT]
        finally:
            await client.close()
            await prefill.drain(timeout=1)
            await decode.drain(timeout=1)

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_a_client_and_its_frontend_leaving_during_the_kv_import_leave_nothing(tiny_loaded, monkeypatch):
    # The decode worker's handler is cancelled while its engine imports the pulled blocks, then
    # once more when the frontend's connection drops: the import still reads an intact payload.
    result = _abandoned_flow(tiny_loaded, monkeypatch, "import")
    assert result.import_errors == []
    assert result.engines_alive == [True, True]
    assert result.left == [NOTHING_LEFT, NOTHING_LEFT]
    assert result.prefill_generated == 1 and result.decode_prompt_tokens == 0  # left before the decode ran


# --- the worker's disaggregation figures: its stats endpoint and the frontend's gauges ---


def test_worker_stats_report_held_exports_and_imported_blocks(tiny_loaded, monkeypatch):
    from prometheus_client.parser import text_string_to_metric_families

    from tandem.frontend.config import FrontendConfig
    from tandem.frontend.frontend import Frontend

    def gauges(frontend: Frontend) -> dict[tuple[str, str], float]:
        """The frontend's tandem_worker_* gauges: (name, worker_id) → value."""
        text = frontend.metrics.render().decode()
        return {
            (sample.name, sample.labels["worker_id"]): sample.value
            for family in text_string_to_metric_families(text)
            if family.name.startswith("tandem_worker_")
            for sample in family.samples
        }

    async def scenario():
        discovery, client = MemoryDiscovery(), RequestPlaneClient()
        prefill, decode = _service(tiny_loaded, discovery, "prefill"), _service(tiny_loaded, discovery, "decode")
        frontend = Frontend(FrontendConfig(port=0, worker_stats_interval_s=0), discovery)
        monkeypatch.setattr(frontend.tokenizers, "preload", lambda source: None)  # "tiny" names no tokenizer
        for service in (prefill, decode):
            await service.start()
        await frontend.start()
        ids = {"prefill": prefill.worker_id, "decode": decode.worker_id}

        async def figures() -> dict[str, tuple[int, int]]:
            """(kv_exports_held, kv_blocks_imported) of each worker, from its stats endpoint."""
            stats = {
                role: await client.call(s.server.address, "stats", {})
                for role, s in (("prefill", prefill), ("decode", decode))
            }
            return {role: (s["kv_exports_held"], s["kv_blocks_imported"]) for role, s in stats.items()}

        async def exported() -> dict[str, tuple[float, float]]:
            """The same figures as the frontend's gauges (after a stats poll)."""
            await frontend.refresh_worker_stats()
            # A worker whose stats lack the two figures (an older version) gets no sample of them.
            frontend.metrics.worker_stats.latest["older"] = ("tiny", {"kv_usage": 0.25})
            values = gauges(frontend)
            assert values[("tandem_worker_kv_usage", "older")] == 0.25
            assert not {key for key in values if key[1] == "older"} - {("tandem_worker_kv_usage", "older")}
            return {
                role: (
                    values[("tandem_worker_kv_exports_held", wid)],
                    values[("tandem_worker_kv_blocks_imported", wid)],
                )
                for role, wid in ids.items()
            }

        try:
            assert await figures() == {"prefill": (0, 0), "decode": (0, 0)}
            first = await _collect(
                client,
                prefill.server.address,
                {"request_id": "p", "token_ids": PROMPT, "sampling": _sampling(1), "export_kv": True},
            )
            params = first[-1]["kv_transfer"]
            assert await figures() == {"prefill": (1, 0), "decode": (0, 0)}  # held for the decode worker
            assert await exported() == {"prefill": (1.0, 0.0), "decode": (0.0, 0.0)}
            await _collect(
                client,
                decode.server.address,
                {
                    "request_id": "d",
                    "token_ids": PROMPT + [first[-1]["token_ids"][-1]],
                    "sampling": _sampling(2),
                    "kv_transfer": params,
                },
            )
            pulled = params["num_blocks"]
            assert pulled == 3
            assert await figures() == {"prefill": (0, 0), "decode": (0, pulled)}  # pulled: released, imported
            assert await exported() == {"prefill": (0.0, 0.0), "decode": (0.0, float(pulled))}
        finally:
            await frontend.stop()
            await client.close()
            await prefill.drain(timeout=1)
            await decode.drain(timeout=1)

    asyncio.run(asyncio.wait_for(scenario(), 60))
