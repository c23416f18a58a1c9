"""Request migration in the frontend: a stream whose worker is lost mid-generation continues on another.

The frontend's real stack (generate_chunks with the SmolLM2 tokenizer → MigratingClient →
DisaggregatedClient → WorkerClient → round-robin over a WorkerPool in memory discovery) talks to
a fake request plane whose workers "generate" a fixed script of tokens: the token at output
position i is ``SCRIPT[i]`` whatever worker produces it, as greedy decoding would. A worker can
be told to break after k tokens in several ways; the migrated output must equal an unbroken run.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from tests.support import run

from tandem.frontend.errors import OpenAIError
from tandem.frontend.generation import GenerationSpec, OutputChunk, generate_chunks
from tandem.frontend.metrics import FrontendMetrics
from tandem.protocols.sampling_params import SamplingParams
from tandem.protocols.worker_card import WorkerCard
from tandem.router.dispatch.migration import MigratingClient, default_migration_limit
from tandem.router.dispatch.prefill_router import DisaggConfig, DisaggregatedClient
from tandem.router.dispatch.worker_client import WorkerClient
from tandem.router.policies.round_robin import RoundRobinPolicy
from tandem.router.worker_pool import WorkerPool
from tandem.runtime.discovery.memory import MemoryDiscovery
from tandem.runtime.request_plane import RemoteError, WorkerUnavailableError

MODEL = "m"
TEXT = (
    " The quick brown fox jumps over the lazy dog, and then it runs far away into the deep green forest,"
    " where nobody ever sees it again. Café naïve 日本語 🙂 end."
)


@pytest.fixture(scope="module")
def tokenizer():
    from tandem.models.tokenizer import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def script(tokenizer) -> list[int]:
    return tokenizer.encode(TEXT, add_special_tokens=False)


# --- a fake request plane ------------------------------------------------------------------


@dataclass
class Fault:
    after: int
    """Tokens this worker streams (per request) before the fault."""
    kind: str = "reset"
    """reset (connection lost), unavailable (error frame of a draining worker, as RemoteError),
    end (the stream ends unfinished), bad_request, internal."""


@dataclass
class FakeWorker:
    role: str = "agg"
    fault: Fault | None = None
    cached: int = 0
    """num_cached_tokens it reports."""
    chunk: int = 2
    """Tokens per delta."""


@dataclass
class FakePlane:
    """``stream_batches``/``call`` of RequestPlaneClient over scripted workers (keyed by address)."""

    script: list[int]
    prompt_len: int
    workers: dict[str, FakeWorker]
    requests: list[tuple[str, dict]] = field(default_factory=list)
    released: list[str] = field(default_factory=list)

    async def stream_batches(self, address: str, endpoint: str, payload: dict) -> AsyncIterator[list[dict]]:
        assert endpoint == "generate"
        self.requests.append((address, payload))
        worker = self.workers[address]
        sampling = payload.get("sampling", {})
        max_tokens = 1 if payload.get("export_kv") else sampling.get("max_tokens", SamplingParams().max_tokens)
        position = len(payload["token_ids"]) - self.prompt_len  # output tokens before this request
        assert payload["token_ids"][self.prompt_len :] == self.script[:position], "carried tokens are wrong"
        sent = 0
        while sent < max_tokens:
            await asyncio.sleep(0)
            if worker.fault is not None and sent >= worker.fault.after:
                raise self._error(address, worker.fault.kind)
            step = min(worker.chunk, max_tokens - sent)
            if worker.fault is not None:
                step = min(step, worker.fault.after - sent)
            tokens = self.script[position + sent : position + sent + step]
            sent += step
            delta: dict[str, Any] = {
                "token_ids": tokens,
                "num_prompt_tokens": len(payload["token_ids"]),
                "num_cached_tokens": worker.cached,
                "num_output_tokens": sent,
            }
            if sampling.get("logprobs") is not None:
                delta["logprobs"] = [{"token_id": t, "logprob": -0.5, "top": []} for t in tokens]
            if sent == max_tokens:
                delta["finish_reason"] = "length"
                if payload.get("export_kv"):
                    delta["kv_transfer"] = {
                        "address": "x:1",
                        "transfer_id": f"t{len(self.requests)}",
                        "num_blocks": 1,
                        "worker_address": address,
                    }
            yield [delta]

    @staticmethod
    def _error(address: str, kind: str) -> Exception:
        if kind == "reset":
            return WorkerUnavailableError(address, "connection lost: [Errno 104] Connection reset by peer")
        if kind == "end":
            return _EndStream()
        return RemoteError(kind, f"fault {kind}")

    async def call(self, address: str, endpoint: str, payload: dict, timeout: float | None = None) -> None:
        assert endpoint == "kv_release"
        self.released.append(payload["transfer_id"])


class _EndStream(Exception):
    """Raised inside the fake stream to end it quietly (see _ending)."""


def _ending(stream: AsyncIterator[list[dict]]) -> AsyncIterator[list[dict]]:
    async def passthrough() -> AsyncIterator[list[dict]]:
        try:
            async for batch in stream:
                yield batch
        except _EndStream:
            return

    return passthrough()


class _Plane(FakePlane):
    def stream_batches(self, address: str, endpoint: str, payload: dict) -> AsyncIterator[list[dict]]:
        return _ending(super().stream_batches(address, endpoint, payload))


# --- the frontend's stack over it -------------------------------------------------------------


def _card(worker_id: str, role: str) -> WorkerCard:
    return WorkerCard(
        worker_id=worker_id,
        model=MODEL,
        tokenizer="t",
        chat_template="t",
        context_length=8192,
        block_size=16,
        total_kv_blocks=1024,
        role=role,
        request_plane_address=f"{worker_id}:1",
        engine="mocker",
    )


@dataclass
class Outcome:
    chunks: list[OutputChunk]
    error: OpenAIError | None
    plane: FakePlane
    metrics: FrontendMetrics
    client: MigratingClient

    @property
    def text(self) -> str:
        return "".join(c.text for c in self.chunks)

    def requests_to(self, worker_id: str) -> list[dict]:
        return [payload for address, payload in self.plane.requests if address == f"{worker_id}:1"]

    def count(self, outcome: str) -> float:
        return self.metrics.migrations.labels(MODEL, outcome)._value.get()


def route_one(
    tokenizer,
    script: list[int],
    workers: dict[str, FakeWorker],
    *,
    prompt: list[int] | None = None,
    limit: int | None = None,
    stop: tuple[str, ...] = (),
    **params: Any,
) -> Outcome:
    """One request (through generate_chunks) on ``workers`` (worker id → behaviour)."""
    prompt = prompt or list(range(1000, 1010))
    plane = _Plane(script, len(prompt), {f"{wid}:1": w for wid, w in workers.items()})
    metrics = FrontendMetrics()

    async def scenario() -> tuple[list[OutputChunk], OpenAIError | None, MigratingClient]:
        discovery = MemoryDiscovery()
        registrations = [await discovery.register(_card(wid, w.role), 30.0) for wid, w in workers.items()]
        pool = WorkerPool(discovery)
        await pool.start()
        workers_client = WorkerClient(pool, RoundRobinPolicy(), plane)  # type: ignore[arg-type]
        inner = DisaggregatedClient(workers_client, DisaggConfig(max_local_prefill_length=16))
        client = MigratingClient(
            inner,
            pool,
            limit,
            on_outcome=lambda model, outcome: metrics.migrations.labels(model, outcome).inc(),
            on_limit=lambda model, value: metrics.migration_limit.labels(model).set(value),
        )
        sampling = SamplingParams(**{"max_tokens": 24, "temperature": 0.0, **params})
        spec = GenerationSpec(MODEL, prompt, sampling, list(stop), tokenizer, request_id="req")
        chunks, error = [], None
        try:
            async for chunk in generate_chunks(spec, client, metrics):
                chunks.append(chunk)
        except OpenAIError as exc:
            error = exc
        finally:
            await pool.stop()
            for registration in registrations:
                await registration.withdraw()
            await discovery.close()
        return chunks, error, client

    chunks, error, client = run(scenario, 30)
    return Outcome(chunks, error, plane, metrics, client)


def two_workers(fault: Fault | None, **first: Any) -> dict[str, FakeWorker]:
    return {"w-a": FakeWorker(fault=fault, **first), "w-b": FakeWorker(cached=7)}


# --- tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["reset", "unavailable", "end"])
@pytest.mark.parametrize("after", [1, 5, 12])
def test_lost_stream_continues_on_another_worker_with_every_token_once(tokenizer, script, kind, after):
    reference = route_one(tokenizer, script, two_workers(None, cached=3), logprobs=0)
    migrated = route_one(tokenizer, script, two_workers(Fault(after, kind), cached=3), logprobs=0)
    assert reference.error is None and migrated.error is None, migrated.error
    assert migrated.text == reference.text == tokenizer.decode(script[:24])
    assert migrated.chunks[-1].finish_reason == "length"
    # usage once: the original prompt, every generated token, the first attempt's cached tokens
    usage = migrated.chunks[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens) == (10, 24, 3)
    assert [lp.logprob for c in migrated.chunks for lp in c.logprobs or []] == [-0.5] * 24
    [first] = migrated.requests_to("w-a")
    [second] = migrated.requests_to("w-b")
    assert first["request_id"] == "req" and second["request_id"] == "req:m1"
    assert second["token_ids"] == first["token_ids"] + script[:after]
    assert second["sampling"]["max_tokens"] == 24 - after
    assert migrated.count("migrated") == 1 and migrated.count("exhausted") == 0
    assert migrated.metrics.migration_limit.labels(MODEL)._value.get() == 1


@pytest.mark.parametrize("after", [7, 8, 9])
def test_stop_strings_and_min_tokens_carry_across_the_switch(tokenizer, script, after):
    stop = ("lazy dog",)  # tokens 7 and 8: the break comes before, inside and after it
    reference = route_one(tokenizer, script, two_workers(None), stop=stop, min_tokens=10)
    migrated = route_one(tokenizer, script, two_workers(Fault(after)), stop=stop, min_tokens=10)
    assert migrated.error is None
    assert migrated.text == reference.text == tokenizer.decode(script[:24]).split("lazy dog")[0]
    assert migrated.chunks[-1].finish_reason == reference.chunks[-1].finish_reason == "stop"
    assert [p["sampling"]["min_tokens"] for p in migrated.requests_to("w-b")] == ([10 - after] if after < 9 else [])


def test_the_lost_worker_is_excluded_even_when_it_would_be_picked(tokenizer, script):
    # Three workers, round-robin: the third request would go back to w-a; each loses its stream.
    workers = {"w-a": FakeWorker(fault=Fault(4)), "w-b": FakeWorker(fault=Fault(4)), "w-c": FakeWorker()}
    outcome = route_one(tokenizer, script, workers, limit=2)
    assert outcome.error is None and outcome.text == tokenizer.decode(script[:24])
    assert [address for address, _ in outcome.plane.requests] == ["w-a:1", "w-b:1", "w-c:1"]
    assert [p["request_id"] for _, p in outcome.plane.requests] == ["req", "req:m1", "req:m2"]
    assert outcome.chunks[-1].usage.completion_tokens == 24
    assert outcome.count("migrated") == 2


def test_limit_zero_ends_the_request_with_a_clear_error(tokenizer, script):
    outcome = route_one(tokenizer, script, two_workers(Fault(5)), limit=0)
    assert outcome.error is not None and outcome.error.status == 502 and outcome.error.code == "worker_lost"
    assert "worker w-a was lost after 5 generated tokens" in outcome.error.message
    assert "--migration-limit 0" in outcome.error.message
    assert tokenizer.decode(script[:5]).startswith(outcome.text)  # what came before stands
    assert outcome.requests_to("w-b") == []
    assert outcome.count("disabled") == 1 and outcome.count("migrated") == 0


def test_exhausted_limit_ends_the_request_with_a_clear_error(tokenizer, script):
    workers = {"w-a": FakeWorker(fault=Fault(3)), "w-b": FakeWorker(fault=Fault(4)), "w-c": FakeWorker()}
    outcome = route_one(tokenizer, script, workers, limit=1)
    assert outcome.error is not None and outcome.error.code == "migration_exhausted", outcome.error
    assert "worker w-b was lost after 7 generated tokens" in outcome.error.message
    assert "gave up after 1 migration(s) (--migration-limit 1)" in outcome.error.message
    assert outcome.requests_to("w-c") == []
    assert outcome.count("migrated") == 1 and outcome.count("exhausted") == 1


def test_no_other_worker_ends_the_request_with_a_clear_error(tokenizer, script):
    outcome = route_one(tokenizer, script, {"w-a": FakeWorker(fault=Fault(5))}, limit=3)
    assert outcome.error is not None and outcome.error.code == "worker_lost" and outcome.error.status == 502
    assert "migration 1 of 3 found no worker to continue it" in outcome.error.message
    assert outcome.count("no_worker") == 1


@pytest.mark.parametrize("kind, status", [("bad_request", 400), ("internal", 500)])
def test_worker_errors_that_are_not_a_lost_worker_are_never_migrated(tokenizer, script, kind, status):
    outcome = route_one(tokenizer, script, two_workers(Fault(5, kind)))
    assert outcome.error is not None and outcome.error.status == status
    assert outcome.requests_to("w-b") == []
    assert outcome.count("migrated") == 0


def test_failure_before_the_first_token_is_a_retry_not_a_migration(tokenizer, script):
    outcome = route_one(tokenizer, script, two_workers(Fault(0)))
    assert outcome.error is None and outcome.text == tokenizer.decode(script[:24])
    [retried] = outcome.requests_to("w-b")
    assert retried["request_id"] == "req" and retried["token_ids"] == list(range(1000, 1010))
    assert outcome.count("migrated") == 0


def test_default_limit_is_one_with_several_serving_workers_else_zero(tokenizer, script):
    assert default_migration_limit(0) == default_migration_limit(1) == 0
    assert default_migration_limit(2) == default_migration_limit(5) == 1
    alone = route_one(tokenizer, script, {"w-a": FakeWorker(fault=Fault(5)), "p": FakeWorker(role="prefill")})
    assert alone.error is not None and "--migration-limit 0" in alone.error.message  # a prefill worker cannot serve
    assert alone.metrics.migration_limit.labels(MODEL)._value.get() == 0
    pair = route_one(tokenizer, script, two_workers(Fault(5)))
    assert pair.error is None and pair.count("migrated") == 1
    assert pair.metrics.migration_limit.labels(MODEL)._value.get() == 1  # decided when the request started
    assert pair.client.limit_for(MODEL) == 0  # now that w-a is marked down, one worker is left
    explicit = route_one(tokenizer, script, two_workers(Fault(5)), limit=0)
    assert explicit.error is not None and explicit.error.code == "worker_lost"


def test_default_limit_is_judged_again_when_the_worker_is_lost():
    """A request that started while only one worker was visible (the other draining or marked
    down) may still migrate if, by the time its worker is lost, another one serves the model."""

    async def scenario():
        discovery = MemoryDiscovery()
        registrations = [await discovery.register(_card(wid, "agg"), 30.0) for wid in ("w-a", "w-b")]
        pool = WorkerPool(discovery)
        await pool.start()
        client = MigratingClient(None, pool)  # type: ignore[arg-type] - only the limit is asked
        try:
            pool.mark_down("w-b")
            assert client.limit_for(MODEL) == 0  # at the start: w-a alone
            pool._down_until.clear()  # w-b is back
            assert client.limit_for(MODEL, exclude={"w-a"}) == 1  # w-a lost, w-b can continue
            pool.mark_down("w-b")
            assert client.limit_for(MODEL, exclude={"w-a"}) == 0  # nobody left
            assert MigratingClient(None, pool, limit=3).limit_for(MODEL, exclude={"w-a"}) == 3  # type: ignore[arg-type]
        finally:
            await pool.stop()
            for registration in registrations:
                await registration.withdraw()

    asyncio.run(asyncio.wait_for(scenario(), 10))


def test_disaggregated_request_migrates_and_is_disaggregated_again(tokenizer, script):
    """Prefill on p, decode on d-a, which is lost; the migrated request (prompt + generated) is
    prefilled on p again and decoded on d-b."""
    prompt = list(range(1000, 1040))  # longer than max_local_prefill_length (16): disaggregated
    workers = {
        "p": FakeWorker(role="prefill"),
        "d-a": FakeWorker(role="decode", fault=Fault(6), cached=32),
        "d-b": FakeWorker(role="decode"),
    }
    outcome = route_one(tokenizer, script, workers, prompt=prompt, logprobs=0)
    assert outcome.error is None, outcome.error
    assert outcome.text == tokenizer.decode(script[:24])
    usage = outcome.chunks[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (40, 24)
    assert len([lp for c in outcome.chunks for lp in c.logprobs or []]) == 24
    prefills = outcome.requests_to("p")
    assert [p["request_id"] for p in prefills] == ["req:prefill", "req:m1:prefill"]
    # the first decode got the prefill's token and lost its stream 6 tokens later: 7 generated
    assert prefills[1]["token_ids"] == prompt + script[:7]
    [decode] = outcome.requests_to("d-b")
    assert decode["request_id"] == "req:m1" and decode["token_ids"] == prompt + script[:8]
    assert decode["sampling"]["max_tokens"] == 24 - 8 and decode["kv_transfer"] is not None
    assert outcome.count("migrated") == 1


def test_frontend_wires_the_limit_from_its_config():
    from tandem.frontend.config import FrontendConfig
    from tandem.frontend.frontend import Frontend

    for limit, expected in ((3, 3), (None, 0)):  # None: 0 while no worker serves the model
        frontend = Frontend(FrontendConfig(migration_limit=limit), MemoryDiscovery())
        assert isinstance(frontend.dispatcher, MigratingClient) and frontend.dispatcher.limit_for(MODEL) == expected
        frontend.tokenizers.shutdown()
    with pytest.raises(ValueError, match="migration_limit"):
        FrontendConfig(migration_limit=-1)


def test_migration_limit_flag():
    import argparse

    from tandem.cli.frontend_cmd import add_frontend_args, frontend_config_from_args

    parser = argparse.ArgumentParser()
    add_frontend_args(parser)
    assert frontend_config_from_args(parser.parse_args([])).migration_limit is None
    assert frontend_config_from_args(parser.parse_args(["--migration-limit", "2"])).migration_limit == 2
