"""Two router replicas fed by the NATS event plane: a router SIGKILLed mid-run and restarted
rebuilds its index from JetStream to the same state as the replica that never stopped.

Real processes: nats-server (JetStream), two `tandem worker --engine mocker --event-plane nats`
with small KV pools (so blocks are evicted too), two `tandem router --event-plane nats`.
Prompts go straight to the workers on the request plane; the routers' indexes are compared
with their `overlap` endpoint on every prompt sent plus some never sent.
"""

from __future__ import annotations

import asyncio
import random
import time

from tests.tandem_process import TandemProcess

from tandem.runtime.request_plane import RequestPlaneClient

MODEL = "mock-model"
NAMESPACE = "e2enats"


def _prompt(seed: int, length: int = 96) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000, 30000) for _ in range(length)]


# Conversations: a turn resends its history plus new tokens, so prompts share prefixes.
def _turn(conversation: int, turn: int) -> list[int]:
    return [t for k in range(turn + 1) for t in _prompt(10_000 * conversation + k, 48)]


def _start(procs: list[TandemProcess], *argv: str, ready: str) -> tuple[TandemProcess, str]:
    """Start ``tandem ARGV`` (kept in ``procs``); return it and the last word of its ``ready`` line."""
    proc = TandemProcess(*argv)
    procs.append(proc)
    return proc, proc.wait_for(ready, timeout=60).string.rsplit(" ", 1)[1].strip()


async def _send(client: RequestPlaneClient, worker: str, prompt: list[int], request_id: str) -> None:
    payload = {
        "request_id": request_id,
        "token_ids": prompt,
        "sampling": {"max_tokens": 4, "temperature": 0.0, "ignore_eos": True},
    }
    async for _ in client.stream(worker, "generate", payload):
        pass


async def _statuses(client: RequestPlaneClient, routers: list[str]) -> list[dict]:
    return [await client.call(r, "status", None, timeout=5) for r in routers]


async def _wait_in_step(
    client: RequestPlaneClient, routers: list[str], workers: int, timeout: float = 30
) -> list[dict]:
    """Wait until every router follows every worker at the same, stable last seq."""
    deadline = time.monotonic() + timeout
    previous = None
    while True:
        statuses = await _statuses(client, routers)
        seqs = [{w: s["last_seq"] for w, s in st["workers"].items()} for st in statuses]
        in_step = all(len(s) == workers and None not in s.values() for s in seqs) and all(s == seqs[0] for s in seqs)
        if in_step and seqs[0] == previous:
            return statuses
        previous = seqs[0] if in_step else None
        assert time.monotonic() < deadline, f"routers never agreed: {seqs}"
        await asyncio.sleep(0.3)


def test_a_restarted_router_rebuilds_the_same_index_as_one_that_never_stopped(tmp_path, nats_server):
    disco = f"file:{tmp_path / 'discovery'}"
    plane = ["--event-plane", "nats", "--nats-url", nats_server.url, "--namespace", NAMESPACE, "--discovery", disco]
    procs: list[TandemProcess] = []
    try:
        workers = []
        for _ in range(2):
            workers.append(
                _start(
                    procs,
                    "worker",
                    "--engine",
                    "mocker",
                    "--speedup-ratio",
                    "0",
                    "--model",
                    MODEL,
                    "--num-kv-blocks",
                    "64",
                    "--log-level",
                    "WARNING",
                    *plane,
                    ready="serving",
                )[1]
            )
        _, router_a = _start(procs, "router", *plane, ready="listening on")
        router_b_proc, router_b = _start(procs, "router", *plane, ready="listening on")

        async def scenario() -> None:
            client = RequestPlaneClient()
            sent: list[list[int]] = []
            count = 0

            async def send_turns(conversations: range, turns: range) -> None:
                nonlocal count
                for turn in turns:
                    for c in conversations:
                        prompt = _turn(c, turn)
                        await _send(client, workers[c % 2], prompt, f"r{count}")
                        sent.append(prompt)
                        count += 1

            try:
                await send_turns(range(6), range(2))  # both routers watching
                await _wait_in_step(client, [router_a, router_b], 2)
                router_b_proc.kill()
                await send_turns(range(6), range(2, 4))  # B misses these
                await send_turns(range(6, 10), range(2))
                _, router_b2 = await asyncio.to_thread(lambda: _start(procs, "router", *plane, ready="listening on"))
                await send_turns(range(10, 12), range(2))  # and B is back for these
                status_a, status_b = await _wait_in_step(client, [router_a, router_b2], 2)
                probes = sent + [_prompt(99_000 + i, 96) for i in range(5)]
                overlaps_a = [await client.call(router_a, "overlap", {"token_ids": p}) for p in probes]
                overlaps_b = [await client.call(router_b2, "overlap", {"token_ids": p}) for p in probes]
                assert overlaps_a == overlaps_b
                assert sum(1 for o in overlaps_a if o) >= len(sent) // 4  # the indexes are not trivially empty
                assert all(not o for o in overlaps_a[len(sent) :])  # never-sent prompts match nothing
                for worker_id, stats in status_b["workers"].items():
                    assert stats["event_transport"] == "nats"
                    assert stats["dumps"] == 0  # rebuilt from the stream alone
                    assert stats["blocks_indexed"] == status_a["workers"][worker_id]["blocks_indexed"]
                    assert status_a["workers"][worker_id]["load"]["num_running"] == 0, status_a
                assert sum(s["events_received"] for s in status_a["workers"].values()) > 0
                deadline = time.monotonic() + 10  # load metrics come every second, on core NATS
                while not all(s["load"] for s in (await _statuses(client, [router_b2]))[0]["workers"].values()):
                    assert time.monotonic() < deadline, "the restarted router never got load metrics"
                    await asyncio.sleep(0.2)
            finally:
                await client.close()

        asyncio.run(asyncio.wait_for(scenario(), 150))
    finally:
        for proc in procs:
            proc.stop()


def test_tandem_serve_on_the_nats_event_plane(nats_server, tmp_path) -> None:
    """`tandem serve GRAPH --event-plane nats`: the workers publish to NATS and the frontend's kv
    router indexes their blocks from there, so a repeated prompt lands where it is cached."""
    import json
    import urllib.request

    import openai
    from tests.e2e.serve_process import ServeProcess

    graph = tmp_path / "graph.yaml"
    graph.write_text(
        "frontend: {port: 0, router: kv}\n"
        "workers:\n  - {engine: mocker, count: 2, model: smollm2-135m-instruct, "
        "flags: {speedup-ratio: 0}}\n"
    )
    serve = ServeProcess(str(graph), "--event-plane", "nats", "--nats-url", nats_server.url)
    try:
        url = serve.wait_ready()

        def status() -> dict:
            return json.loads(urllib.request.urlopen(url + "/router/status", timeout=10).read())

        workers = status()["workers"]
        assert len(workers) == 2 and all(w["kv_events_address"].startswith("nats://") for w in workers.values())
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30)
        prompt = _prompt(7, 160)
        client.completions.create(model="smollm2-135m-instruct", prompt=prompt, max_tokens=2, temperature=0)
        deadline = time.monotonic() + 10
        while sum(w["blocks_indexed"] for w in status()["workers"].values()) < 10:
            assert time.monotonic() < deadline, f"the router indexed nothing from NATS: {status()}"
            time.sleep(0.1)
        second = client.completions.create(model="smollm2-135m-instruct", prompt=prompt, max_tokens=2, temperature=0)
        assert second.usage.prompt_tokens_details.cached_tokens == 160 - 16
        client.close()
    finally:
        serve.stop()
    assert "Traceback" not in serve.output, serve.output
