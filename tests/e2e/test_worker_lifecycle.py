"""Worker lifecycle as real processes: a worker whose engine dies leaves discovery at once and exits
1; SIGTERM under load (a frontend, two mocker workers, 16 streaming clients on the official
`openai` client) fails no request, withdraws the card at once and exits 0; with a drain timeout
shorter than the requests, the frontend migrates the streams the worker ends."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
import urllib.request

import openai
import pytest
from tests.tandem_process import TandemProcess

from tandem.engine.faults import ENV_VAR
from tandem.runtime.discovery.file import FileDiscovery
from tandem.runtime.request_plane import RequestPlaneClient, WorkerUnavailableError

MODEL = "smollm2-135m-instruct"  # the mocker serves it; the frontend loads its tokenizer
STEP_MS = 30  # every mocker step takes this long: a 100-token request lasts ~3 s
MOCKER = [
    "--engine",
    "mocker",
    "--model",
    MODEL,
    "--speedup-ratio",
    "1",
    "--no-kv-events",
    "--mocker-prefill-coeffs",
    "0",
    "0",
    str(STEP_MS),
    "--mocker-decode-coeffs",
    "0",
    "0",
    str(STEP_MS),
]
NUM_CLIENTS = 16


@pytest.fixture
def procs():
    started: list[TandemProcess] = []
    yield started
    for proc in started:
        proc.kill()


def cards(disco_dir) -> list:
    async def read() -> list:
        discovery = FileDiscovery(disco_dir)
        try:
            return await discovery.list(MODEL)
        finally:
            await discovery.close()

    return asyncio.run(read())


def start_worker(
    procs: list[TandemProcess], disco_dir, *flags: str, env: dict[str, str] | None = None
) -> tuple[TandemProcess, str]:
    """A mocker worker; returns it and its worker id once it serves."""
    worker = TandemProcess("worker", *MOCKER, "--discovery", f"file:{disco_dir}", "--ttl", "30", *flags, env=env)
    procs.append(worker)
    return worker, worker.wait_for(r"^worker (\S+) serving ").group(1)


def start_frontend(procs: list[TandemProcess], disco_dir, num_workers: int) -> str:
    frontend = TandemProcess("frontend", "--port", "0", "--discovery", f"file:{disco_dir}")
    procs.append(frontend)
    base_url = frontend.wait_for(r"frontend listening on (http://\S+)/v1").group(1)
    deadline = time.monotonic() + 60
    while len(get_json(base_url + "/health").get("models", {}).get(MODEL, [])) < num_workers:
        assert time.monotonic() < deadline, get_json(base_url + "/health")
        time.sleep(0.1)
    return base_url


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def wait_until_gone(disco_dir, worker_id: str, since: float, limit_s: float) -> float:
    """Seconds from ``since`` until ``worker_id``'s card left discovery (fails past ``limit_s``)."""
    while any(card.worker_id == worker_id for card in cards(disco_dir)):
        assert time.monotonic() - since < limit_s, f"{worker_id} still in discovery"
        time.sleep(0.05)
    return time.monotonic() - since


async def stream_completion(client: openai.AsyncOpenAI, max_tokens: int) -> tuple[str, int, int]:
    """(finish_reason, streamed text chunks, usage.completion_tokens) of one streaming request."""
    stream = await client.completions.create(
        model=MODEL,
        prompt="Tell me a long story about a lighthouse keeper",
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    finish_reason, chunks, usage = None, 0, None
    async for chunk in stream:
        if chunk.choices:
            chunks += 1
            finish_reason = chunk.choices[0].finish_reason or finish_reason
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
    return finish_reason, chunks, usage


def test_a_worker_whose_engine_dies_leaves_discovery_at_once_and_exits_1(tmp_path, procs):
    disco_dir = tmp_path / "discovery"
    worker, worker_id = start_worker(procs, disco_dir, "--speedup-ratio", "0", env={ENV_VAR: "fail_after_steps:20"})
    [card] = cards(disco_dir)

    async def generate() -> None:
        client = RequestPlaneClient()
        try:
            body = {
                "request_id": "r1",
                "token_ids": list(range(10, 40)),
                "sampling": {"max_tokens": 100, "ignore_eos": True},
            }
            with pytest.raises(WorkerUnavailableError, match="engine failed"):
                async for _ in client.stream(card.request_plane_address, "generate", body):
                    pass
        finally:
            await client.close()

    asyncio.run(asyncio.wait_for(generate(), 30))
    failed_at = time.monotonic()
    assert wait_until_gone(disco_dir, worker_id, failed_at, limit_s=2.0) < 2.0  # the TTL is 30 s
    assert worker.wait(timeout=15) == 1, worker.output
    assert "engine failed" in worker.output


def test_a_second_signal_exits_at_once_with_70(tmp_path, procs):
    disco_dir = tmp_path / "discovery"
    worker, worker_id = start_worker(procs, disco_dir, "--drain-timeout", "60")
    [card] = cards(disco_dir)

    async def stream_then_signal_twice() -> float:
        client = RequestPlaneClient()
        try:
            body = {
                "request_id": "long",
                "token_ids": list(range(10, 40)),
                "sampling": {"max_tokens": 2000, "ignore_eos": True},
            }  # ~60 s
            stream = client.stream(card.request_plane_address, "generate", body)
            await anext(stream)
            worker.proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(wait_until_gone, disco_dir, worker_id, time.monotonic(), 2.0)  # withdrawn
            signalled = time.monotonic()
            worker.proc.send_signal(signal.SIGTERM)
            with pytest.raises(WorkerUnavailableError):
                async for _ in stream:
                    pass
            return signalled
        finally:
            await client.close()

    signalled = asyncio.run(asyncio.wait_for(stream_then_signal_twice(), 60))
    assert worker.wait(timeout=10) == 70
    assert time.monotonic() - signalled < 3.0
    assert "draining" in worker.output


async def _load(base_url: str, on_started, max_tokens: int, waves: int) -> list:
    """NUM_CLIENTS clients, each sending ``waves`` streaming requests one after the other;
    ``on_started()`` runs (in a thread) while they do. Returns every outcome."""
    client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0, timeout=60)

    async def one_client() -> list:
        outcomes = []
        for _ in range(waves):
            try:
                outcomes.append(await stream_completion(client, max_tokens))
            except Exception as exc:  # every failure is reported by the test
                outcomes.append(exc)
        return outcomes

    try:
        tasks = [asyncio.create_task(one_client()) for _ in range(NUM_CLIENTS)]
        await asyncio.to_thread(on_started)
        return [outcome for outcomes in await asyncio.gather(*tasks) for outcome in outcomes]
    finally:
        await client.close()


def _sigterm_under_load(tmp_path, procs, drain_timeout: float, max_tokens: int) -> dict:
    """Two workers behind a frontend; SIGTERM the first while NUM_CLIENTS clients stream."""
    disco_dir = tmp_path / "discovery"
    flags = ("--drain-timeout", str(drain_timeout))
    (victim, victim_id), _ = (start_worker(procs, disco_dir, *flags), start_worker(procs, disco_dir, *flags))
    base_url = start_frontend(procs, disco_dir, num_workers=2)
    [victim_card] = [c for c in cards(disco_dir) if c.worker_id == victim_id]
    timings: dict = {}

    def terminate() -> None:
        deadline = time.monotonic() + 30
        while (health := asyncio.run(_health(victim_card.request_plane_address)))["num_running"] < 4:
            assert time.monotonic() < deadline, health  # it must have work to drain
            time.sleep(0.05)
        assert health["status"] == "ok", health
        timings["running_at_signal"] = health["num_running"]
        timings["signalled"] = time.monotonic()
        victim.proc.send_signal(signal.SIGTERM)
        exited.start()
        timings["card_gone_s"] = wait_until_gone(disco_dir, victim_id, timings["signalled"], limit_s=1.0)

    def wait_for_exit() -> None:
        timings["exit_code"] = victim.wait(timeout=drain_timeout + 30)
        timings["exit_s"] = time.monotonic() - timings["signalled"]

    exited = threading.Thread(target=wait_for_exit, daemon=True)
    outcomes = asyncio.run(asyncio.wait_for(_load(base_url, terminate, max_tokens, waves=2), 120))
    exited.join(drain_timeout + 30)
    failures = [o for o in outcomes if not isinstance(o, tuple) or o[0] != "length" or o[2] != max_tokens]
    timings.update(outcomes=outcomes, failures=failures, victim_output=victim.output)
    return timings


async def _health(address: str) -> dict:
    client = RequestPlaneClient()
    try:
        return await client.call(address, "health", None)
    finally:
        await client.close()


def test_sigterm_under_load_fails_no_request_and_exits_0(tmp_path, procs):
    """Requests last ~3 s, the drain timeout is 20 s: in-flight streams finish on the draining
    worker; the second wave goes to the survivor (or, refused, is retried there)."""
    result = _sigterm_under_load(tmp_path, procs, drain_timeout=20.0, max_tokens=100)
    assert result["failures"] == [], result["failures"]
    assert len(result["outcomes"]) == 2 * NUM_CLIENTS
    assert result["exit_code"] == 0, result["victim_output"]
    assert result["card_gone_s"] < 1.0
    # It exits once its streams are done (grace + ~3 s of requests, slower on a busy machine),
    # not at the drain timeout.
    assert result["exit_s"] < 15.0
    assert "draining" in result["victim_output"]


def test_drain_timeout_shorter_than_the_requests_migrates_them(tmp_path, procs):
    """Requests last ~6 s, the drain ends streams after 1 s (+1 s grace) with 'worker drained;
    migrate': the frontend continues them on the survivor, and no client sees an error."""
    result = _sigterm_under_load(tmp_path, procs, drain_timeout=1.0, max_tokens=200)
    assert result["failures"] == [], result["failures"]
    assert result["exit_code"] == 0, result["victim_output"]
    assert result["card_gone_s"] < 1.0
    assert result["exit_s"] < 1.0 + 1.0 + 6.0  # grace + drain + exit (interpreter teardown takes seconds)
    assert "still running after the 1.0s drain timeout" in result["victim_output"]
