"""Multi-host: the disaggregated graph with a KV router across network namespaces (issue 7).

Hosts (tests/netns_fixtures.py): ``infra`` (etcd, NATS), ``prefill``, ``decode1``, ``decode2``
(one builtin worker each on the real SmolLM2-135M-Instruct, one torch thread each: what a
2-core machine bears) and ``frontend`` (``--router kv``); every process bound to its host's
address. The openai client runs on a thread of this process inside the frontend's namespace.

1. Smoke: a process on one host reaches another host's address, and ``link_down`` cuts it.
2. The graph serves: greedy text equals the aggregated engine's, the KV blocks crossed hosts.
3. Cutting a decode host's link under streaming load: its streams migrate (every text equals
   the greedy reference, no client error) and its lease expires (gone from /health within
   TTL + 2 s of the cut). Needs etcd discovery, request-plane keepalive and migration.
"""

from __future__ import annotations

import asyncio
import importlib.util
import random
import re
import socket
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import httpx2 as httpx
import openai
import pytest
from tests.e2e.multihost_graph import MODEL, WORKER_TTL_S, Graph, planes, start_graph
from tests.netns_fixtures import DECODE_HOSTS, FRONTEND, PREFILL

from tandem.engine.config import EngineConfig
from tandem.engine.llm_engine import LLMEngine
from tandem.protocols.sampling_params import SamplingParams
from tandem.runtime.request_plane import RequestPlaneClient

pytestmark = pytest.mark.e2e

MAX_TOKENS = 8
STREAM_MAX_TOKENS = 64
"""Long enough that every stream is still decoding when the link is cut."""


def _prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 20_000) for _ in range(length)]


SERVE_PROMPTS = [_prompt(n, seed=300 + n) for n in (20, 200, 600)]
STREAM_PROMPTS = [_prompt(100 + 40 * i, seed=400 + i) for i in range(4)]
"""Over --max-local-prefill-length (64): each runs in two halves, prefill host then a decode host."""


# --- 1. the bed itself ------------------------------------------------------------------------------------

_MARKER_SERVER = """
import socket, sys, time
server = socket.create_server((sys.argv[1], int(sys.argv[2])))
server.settimeout(1.0)
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    try:
        conn, _ = server.accept()
    except TimeoutError:
        continue
    conn.sendall(sys.argv[3].encode())
    conn.close()
"""


def _read_marker(address: str, port: int, timeout_s: float) -> str:
    with socket.create_connection((address, port), timeout=timeout_s) as conn:
        conn.settimeout(timeout_s)
        return conn.recv(64).decode()


def _wait_marker(bed, host: str, address: str, port: int, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return bed.call(host, _read_marker, address, port, 1.0)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_hosts_reach_each_other_and_link_down_cuts_a_host_off(testbed):
    bed = testbed.bed
    target = DECODE_HOSTS[0]
    server = bed.run(target, [sys.executable, "-c", _MARKER_SERVER, bed.address(target), "7000", target])
    try:
        # What answers is the process on the target host (the marker says so), reached over the bridge.
        assert _wait_marker(bed, FRONTEND, bed.address(target), 7000, timeout_s=15) == target
        bed.call(PREFILL, socket.create_connection, (testbed.etcd.host, testbed.etcd.port), 2).close()  # etcd on infra
        bed.link_down(target)
        with pytest.raises(OSError):
            bed.call(FRONTEND, _read_marker, bed.address(target), 7000, 1.0)
        # The host itself keeps running: its own address still answers on its side of the cut.
        assert bed.call(target, _read_marker, bed.address(target), 7000, 1.0) == target
        bed.link_up(target)
        assert _wait_marker(bed, FRONTEND, bed.address(target), 7000, timeout_s=10) == target
    finally:
        bed.link_up(target)
        server.kill()
        server.wait(5)


# --- 2. the graph serves across hosts ---------------------------------------------------------------------


def _reference_texts() -> dict[tuple[int, ...], str]:
    """Greedy text of every prompt from an aggregated builtin engine in this process."""
    engine = LLMEngine(EngineConfig(model=MODEL, dtype="float32", num_kv_blocks=1024))
    texts = {}
    for prompts, max_tokens in ((SERVE_PROMPTS, MAX_TOKENS), (STREAM_PROMPTS, STREAM_MAX_TOKENS)):
        outputs = engine.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
        texts.update(
            {
                tuple(prompt): engine.loaded.tokenizer.decode(out, skip_special_tokens=True)
                for prompt, out in zip(prompts, outputs, strict=True)
            }
        )
    return texts


@dataclass
class Deployment:
    graph: Graph
    reference_future: Future[dict[tuple[int, ...], str]]

    def reference(self, prompt: list[int]) -> str:
        return self.reference_future.result(timeout=600)[tuple(prompt)]


@pytest.fixture(scope="module")
def deployment(testbed, tmp_path_factory):
    with ThreadPoolExecutor(1) as pool:
        reference = pool.submit(_reference_texts)  # while the workers load
        graph = start_graph(testbed, tmp_path_factory.mktemp("graph"))
        try:
            yield Deployment(graph, reference)
        finally:
            graph.stop()
            print(graph.report())


def _metric(graph: Graph, sample: str) -> float:
    text = graph.call(lambda: httpx.get(graph.url + "/metrics", timeout=10).text, timeout_s=30)
    found = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def _disaggregated(graph: Graph) -> float:
    return _metric(graph, f'tandem_frontend_disaggregated_requests_total{{model="{MODEL}",outcome="disaggregated"}}')


def _complete(url: str, prompt: list[int]) -> openai.types.Completion:
    with openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120) as client:
        return client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True}
        )


def test_the_disagg_router_graph_serves_across_hosts(deployment, testbed):
    graph, bed = deployment.graph, testbed.bed
    # Every worker serves on its own host's address (and so do its KV events and transfers).
    for worker_id, entry in graph.live_workers().items():
        [host] = [h for h, w in graph.worker_ids.items() if w == worker_id]
        assert entry["address"].rsplit(":", 1)[0] == bed.address(host)
        assert entry["role"] == ("prefill" if host == PREFILL else "decode")
    assert graph.url.startswith(f"http://{bed.address(FRONTEND)}:")
    before = _disaggregated(graph)
    for prompt in SERVE_PROMPTS:
        out = graph.call(_complete, graph.url, prompt)
        assert out.choices[0].text == deployment.reference(prompt), f"prompt of {len(prompt)} tokens"
        assert out.usage.prompt_tokens == len(prompt) and out.usage.completion_tokens == MAX_TOKENS
    # The two long prompts ran in two halves: prefill on one host, KV pulled across the bridge.
    assert _disaggregated(graph) - before == 2


# --- 3. a decode host's link is cut under load ------------------------------------------------------------

_NEEDS = {
    "etcd discovery (a cut-off worker's lease must expire)": lambda: planes()[0] == "etcd",
    "request-plane keepalive": lambda: importlib.util.find_spec("tandem.runtime.request_plane.keepalive") is not None,
    "request migration": lambda: importlib.util.find_spec("tandem.router.dispatch.migration") is not None,
}
_MISSING = [what for what, present in _NEEDS.items() if not present()]


@dataclass
class CutOutcome:
    victim: str
    running_at_cut: int
    removal_s: float | None
    """Seconds from the cut until the victim left /health (None: not within the bound)."""
    completed_s: float
    """Seconds from the cut until the last stream ended."""
    results: list[tuple[str, str | None] | BaseException]
    """(text, finish_reason) per stream, or what it raised."""


async def _stream(
    client: openai.AsyncOpenAI, prompt: list[int], chunks: list[int], index: int
) -> tuple[str, str | None]:
    stream = await client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=STREAM_MAX_TOKENS,
        temperature=0,
        stream=True,
        logprobs=1,  # a chunk per token
        extra_body={"ignore_eos": True},
    )
    text, finish = "", None
    async for chunk in stream:
        chunks[index] += 1
        text += chunk.choices[0].text
        finish = chunk.choices[0].finish_reason or finish
    return text, finish


async def _running(address: str) -> int:
    client = RequestPlaneClient()
    try:
        return (await client.call(address, "stats", {}, timeout=10))["num_running"]
    finally:
        await client.close()


async def _wait_gone(graph: Graph, worker_id: str, since: float, bound_s: float) -> float | None:
    async with httpx.AsyncClient(timeout=5) as http:
        while time.monotonic() - since < bound_s:
            entries = (await http.get(graph.url + "/health")).json()["models"].get(MODEL, [])
            if worker_id not in {entry["worker_id"] for entry in entries}:
                return time.monotonic() - since
            await asyncio.sleep(0.1)
    return None


async def _cut_under_load(graph: Graph, addresses: dict[str, str]) -> CutOutcome:
    """Start the streams, cut the busiest decode host (``addresses``: decode host → request-plane
    address) once all streams are decoding, and wait for them to end."""
    bed, chunks = graph.cluster.bed, [0] * len(STREAM_PROMPTS)
    async with openai.AsyncOpenAI(base_url=graph.url + "/v1", api_key="x", max_retries=0, timeout=180) as client:
        tasks = [asyncio.ensure_future(_stream(client, p, chunks, i)) for i, p in enumerate(STREAM_PROMPTS)]
        deadline = time.monotonic() + 240
        while min(chunks) < 2 and time.monotonic() < deadline and not all(t.done() for t in tasks):
            await asyncio.sleep(0.02)
        running = {host: await _running(address) for host, address in addresses.items()}
        victim = max(running, key=running.__getitem__)
        bed.link_down(victim)
        cut_at = time.monotonic()
        removal = await _wait_gone(graph, graph.worker_ids[victim], cut_at, bound_s=WORKER_TTL_S + 10)
        _, pending = await asyncio.wait(tasks, timeout=180)
        for task in pending:
            task.cancel()
        completed = time.monotonic() - cut_at
        results = [
            TimeoutError("stream did not end") if task in pending else task.exception() or task.result()
            for task in tasks
        ]
        return CutOutcome(victim, running[victim], removal, completed, results)


@pytest.mark.xfail(bool(_MISSING), reason=f"not in this tree yet: {', '.join(_MISSING)}", strict=False)
def test_cutting_a_decode_hosts_link_migrates_its_streams_and_expires_its_lease(deployment):
    graph = deployment.graph
    migrated = _metric(graph, f'tandem_frontend_migrations_total{{model="{MODEL}",outcome="migrated"}}')
    workers = graph.live_workers()
    addresses = {host: workers[graph.worker_ids[host]]["address"] for host in DECODE_HOSTS}
    outcome = graph.call(asyncio.run, _cut_under_load(graph, addresses), timeout_s=480)
    try:
        assert outcome.running_at_cut >= 1, "the cut host had no stream in flight: the test proved nothing"
        errors = [r for r in outcome.results if isinstance(r, BaseException)]
        assert not errors, f"clients saw errors: {errors}"
        for prompt, (text, finish) in zip(STREAM_PROMPTS, outcome.results, strict=True):
            assert finish == "length"
            assert text == deployment.reference(prompt), f"prompt of {len(prompt)} tokens"
        assert outcome.removal_s is not None, (
            f"{outcome.victim} still in /health {WORKER_TTL_S + 10:.0f}s after the cut"
        )
        assert outcome.removal_s <= WORKER_TTL_S + 2, f"lease expired {outcome.removal_s:.1f}s after the cut"
        after = _metric(graph, f'tandem_frontend_migrations_total{{model="{MODEL}",outcome="migrated"}}')
        assert after - migrated >= 1  # the streams did move (their texts above show it was seamless)
    finally:
        graph.cluster.bed.link_up(outcome.victim)
    print(
        f"cut {outcome.victim} with {outcome.running_at_cut} streams in flight: gone from /health after "
        f"{outcome.removal_s:.2f}s, every stream complete after {outcome.completed_s:.2f}s"
    )
