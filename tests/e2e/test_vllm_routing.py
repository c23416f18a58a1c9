"""KV routing and request migration on vLLM workers: `tandem serve --engine vllm --workers 2
--router kv` on the real SmolLM2-135M-Instruct, the official openai client.

One server for the module (two vLLM workers, 32-token blocks). In order:

- KV routing: a prompt's blocks reach the router's index through the worker's relay of vLLM's KV
  events (the router hashes token ids with the card's block size, 32, and must find vLLM's blocks
  under the same hashes), and a repeat goes to the worker that holds them, where vLLM reports
  them cached.
- Migration (last: it kills a worker): 4 concurrent greedy streams; once each has text, the worker
  running the most of them gets SIGKILL, its vLLM engine core with it. Every stream completes
  without an error, with exactly the text vLLM's own ``LLM.generate`` gives for it.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import signal
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import openai
import psutil
import pytest
from tests.e2e.serve_process import ServeProcess
from tests.e2e.vllm_reference import BLOCK_SIZE, MODEL, SERVE_ARGS, VLLM_ENV, Greedy, Prompts, VllmReference
from tests.support import router_status, worker_stats

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PROMPT_LEN = 5 * BLOCK_SIZE
TOPICS = ["a lighthouse keeper", "a lost robot", "a dragon who bakes bread", "a tiny submarine"]
STORIES = [f"Write a long, detailed story about {topic}." for topic in TOPICS]
MAX_TOKENS = 48


@pytest.fixture(scope="module")
def serve():
    server = ServeProcess(
        "--port",
        "0",
        *SERVE_ARGS,
        "--workers",
        "2",
        "--router",
        "kv",
        "--drain-timeout",
        "5",
        env=VLLM_ENV,
        new_session=True,
    )
    try:
        yield server
    finally:
        server.stop()
        server.kill_group()  # the killed worker's engine core too, had it survived


@pytest.fixture(scope="module")
def reference(serve) -> list[Greedy]:
    """vLLM's own greedy stories (ignoring EOS, as the streams do), computed while the server boots."""
    prompts = Prompts()
    requests = [
        {"prompt_token_ids": prompts.chat_ids(story), "max_tokens": MAX_TOKENS, "ignore_eos": True} for story in STORIES
    ]
    runner = VllmReference(requests)
    try:
        outputs = runner.result()
    finally:
        runner.close()
    return [prompts.greedy(r, o) for r, o in zip(requests, outputs, strict=True)]


@pytest.fixture(scope="module")
def url(serve, reference):
    return serve.wait_ready(timeout=300)


def _prompt(seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000, 30000) for _ in range(PROMPT_LEN)]


def _served_by(url: str, before: dict) -> str:
    """The worker whose finished-request count went up since ``before`` (a status snapshot)."""
    deadline = time.monotonic() + 5
    while True:
        after = router_status(url)["workers"]
        served = [w for w, s in after.items() if s["requests_finished"] > before[w]["requests_finished"]]
        if served or time.monotonic() > deadline:
            (worker,) = served
            return worker
        time.sleep(0.05)


# --- KV routing -------------------------------------------------------------------------------------


def test_a_prompt_is_indexed_and_its_repeat_goes_where_vllm_cached_it(url):
    status = router_status(url)
    assert (status["policy"], status["block_size"]) == ("kv", BLOCK_SIZE)  # the vLLM card's block size
    assert len(status["workers"]) == 2 and all(s["kv_events_address"] for s in status["workers"].values())
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
    blocks = PROMPT_LEN // BLOCK_SIZE
    served = set()
    for seed in range(4):
        prompt = _prompt(seed)
        before = router_status(url)
        first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        assert before["cached_blocks"] == router_status(url)["cached_blocks"]  # the router knew none of it
        worker = _served_by(url, before["workers"])
        served.add(worker)
        deadline = time.monotonic() + 5  # its BlockStored events reach the router through the relay
        while (
            router_status(url)["workers"][worker]["blocks_indexed"]
            < before["workers"][worker]["blocks_indexed"] + blocks
        ):
            assert time.monotonic() < deadline, f"the router never indexed the prompt's blocks: {router_status(url)}"
            time.sleep(0.05)

        before = router_status(url)
        second = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
        after = router_status(url)
        assert _served_by(url, before["workers"]) == worker
        # The router matched every block of the prompt under its own hashes...
        assert (after["prompt_blocks"] - before["prompt_blocks"], after["cached_blocks"] - before["cached_blocks"]) == (
            blocks,
            blocks,
        )
        # ...and vLLM found them: all but the last block, as it always computes the last token.
        assert second.usage.prompt_tokens_details.cached_tokens == PROMPT_LEN - BLOCK_SIZE
        assert second.choices[0].text == first.choices[0].text
    client.close()
    status = router_status(url)
    for worker_id, s in status["workers"].items():
        assert s["dumps"] >= 1 and s["serves_kv_dump"], (worker_id, s)  # dumped when discovered
        assert (s["index_rebuilds"], s["malformed_events"], s["events_missing"]) == (0, 0, False), (worker_id, s)
        if worker_id in served:
            assert s["events_received"] >= 1 and s["blocks_indexed"] >= blocks
    assert status["hit_rate"] > 0.4  # every repeat hit all its blocks


# --- migration (last: it kills a worker) -------------------------------------------------------------


@dataclass
class StreamResult:
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int | None = None
    error: Exception | None = None


def stream_all(url: str, on_all_started) -> list[StreamResult]:
    """The stories at once (greedy, ignoring EOS); ``on_all_started`` runs once each has text."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=300)
    results = [StreamResult() for _ in STORIES]
    lock, all_started, waiting = threading.Lock(), threading.Event(), [len(STORIES)]

    def count_started() -> None:
        with lock:
            waiting[0] -= 1
            if waiting[0] == 0:
                all_started.set()

    def one(index: int) -> None:
        result, first = results[index], True
        try:
            stream = client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": STORIES[index]}],
                max_tokens=MAX_TOKENS,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
            for chunk in stream:
                if chunk.usage is not None:
                    result.completion_tokens = chunk.usage.completion_tokens
                for choice in chunk.choices:
                    if choice.delta.content:
                        result.text += choice.delta.content
                        if first:
                            first = False
                            count_started()
                    result.finish_reason = choice.finish_reason or result.finish_reason
        except Exception as exc:  # recorded and asserted on by the test
            result.error = exc
        finally:
            if first:
                count_started()

    with ThreadPoolExecutor(len(STORIES)) as pool:
        futures = [pool.submit(one, i) for i in range(len(STORIES))]
        if all_started.wait(timeout=300):
            on_all_started()
        for future in futures:
            future.result()
    client.close()
    return results


async def _running(address: str) -> int:
    return int((await worker_stats(address))["num_running"])


def _process_serving(serve: ServeProcess, address: str) -> psutil.Process:
    """The `tandem worker` process listening on ``address`` (host:port)."""
    port = int(address.rsplit(":", 1)[1])
    for proc in serve.worker_processes():
        if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in proc.net_connections("tcp")):
            return proc
    raise AssertionError(f"no worker process listens on {address}")


def test_sigkill_of_a_vllm_worker_mid_stream_migrates_every_request(serve, url, reference):
    with urllib.request.urlopen(url + "/health", timeout=10) as response:
        addresses = [w["address"] for w in json.load(response)["models"][MODEL]]
    assert len(addresses) == 2
    killed: list[tuple[int, list[psutil.Process], list[str]]] = []

    def kill() -> None:
        # The worker running most of the streams, with everything it started: it shares the serve
        # process's group, and vLLM's engine core outlives a SIGKILLed worker on its own.
        running = {a: asyncio.run(_running(a)) for a in addresses}
        address = max(addresses, key=lambda a: running[a])
        victim = _process_serving(serve, address)
        tree = [victim, *victim.children(recursive=True)]
        names = [p.name() for p in tree]
        for proc in tree:
            proc.send_signal(signal.SIGKILL)
        killed.append((running[address], tree, names))

    results = stream_all(url, kill)
    assert killed, "the streams never all started"
    on_victim, tree, names = killed[0]
    assert on_victim >= 1 and "VLLM::EngineCore" in names, (on_victim, names)
    deadline = time.monotonic() + 10
    while alive := [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]:
        assert time.monotonic() < deadline, f"still running after SIGKILL: {alive}"
        time.sleep(0.1)
    for story, got, want in zip(STORIES, results, reference, strict=True):
        assert got.error is None, f"{story}: {got.error!r}\n{serve.output[-4000:]}"
        assert got.finish_reason == "length", story
        assert got.text == want.text, f"{story}:\n got: {got.text!r}\nwant: {want.text!r}"
        assert got.completion_tokens == len(want.output_ids) == MAX_TOKENS, story
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        metrics = response.read().decode()
    migrated = re.search(rf'tandem_frontend_migrations_total{{model="{MODEL}",outcome="migrated"}} (\S+)', metrics)
    assert migrated is not None and float(migrated.group(1)) >= on_victim, metrics
    assert serve.wait_for_line("exited with code -9", timeout=5)  # serve noticed the dead worker
