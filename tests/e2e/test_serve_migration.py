"""Request migration end to end on the real SmolLM2-135M-Instruct: two `tandem worker` processes and
a `tandem frontend` (file discovery in a temporary directory), the official openai client.

- 16 concurrent streaming chats (greedy); once every stream has received text, one worker gets
  SIGKILL. Every request completes without an error, each client's text and completion-token
  count equal what the same request got from the same deployment without a failure, and the
  frontend counted the migrations.
- With ``--migration-limit 0`` the killed worker's streams end with the SSE error event (the
  openai client raises APIError) that says what happened; the other streams complete.

Client-side timings (TTFT, inter-token gaps) of the streams are printed (``-s``) to compare the
migrated requests with the survivors.
"""

from __future__ import annotations

import re
import signal
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import openai
import pytest
from tests.tandem_process import TandemProcess

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# float32 throughout: texts are compared token for token across engines, batchings and KV imports,
# where bfloat16 rounding flips near-ties (tests/e2e/test_engine_bf16_vs_hf.py covers bfloat16).
MODEL = "smollm2-135m-instruct"
NUM_REQUESTS = 16
MAX_TOKENS = 48
TOPICS = [
    "a lighthouse keeper",
    "a lost robot",
    "a dragon who bakes bread",
    "a tiny submarine",
    "an old clock",
    "a brave snail",
    "a cloud that hates rain",
    "a chess-playing cat",
    "a haunted bicycle",
    "the last tree",
    "a singing volcano",
    "a detective owl",
    "a paper boat",
    "a moon made of cheese",
    "a shy giant",
    "a river that flows uphill",
]
PROMPTS = [f"Write a long, detailed story about {topic}." for topic in TOPICS]
assert len(PROMPTS) == NUM_REQUESTS


def start_worker(discovery: Path) -> TandemProcess:
    worker = TandemProcess(
        "worker",
        "--model",
        MODEL,
        "--discovery",
        f"file:{discovery}",
        "--ttl",
        "3",
        "--threads",
        "1",
        "--dtype",
        "float32",
        "--num-kv-blocks",
        "512",
        "--no-kv-events",
        "--drain-timeout",
        "2",
    )
    worker.wait_for(r"serving ", timeout=180)
    return worker


def start_frontend(discovery: Path, *flags: str) -> tuple[TandemProcess, str]:
    frontend = TandemProcess("frontend", "--port", "0", "--discovery", f"file:{discovery}", *flags)
    url = frontend.wait_for(r"frontend listening on (http://\S+)/v1", timeout=60).group(1)
    return frontend, url


def wait_for_workers(url: str, count: int, timeout: float = 60) -> None:
    import json

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as response:
                if len(json.load(response)["models"].get(MODEL, [])) == count:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{count} workers not in {url}/health within {timeout}s")


def scrape(url: str) -> str:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        return response.read().decode()


@dataclass
class StreamResult:
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int | None = None
    error: Exception | None = None
    started: float = 0.0
    arrivals: list[float] = field(default_factory=list)
    """When each content chunk arrived (perf_counter)."""

    @property
    def ttft(self) -> float:
        return self.arrivals[0] - self.started

    @property
    def max_gap(self) -> float:
        return max((b - a for a, b in zip(self.arrivals, self.arrivals[1:])), default=0.0)


def stream_all(url: str, on_all_started: Callable[[], None] | None = None) -> list[StreamResult]:
    """The 16 chats at once; ``on_all_started`` runs once every stream has received some text."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=300)
    results = [StreamResult() for _ in PROMPTS]
    lock, all_started, waiting = threading.Lock(), threading.Event(), [NUM_REQUESTS]

    def count_started() -> None:
        with lock:
            waiting[0] -= 1
            if waiting[0] == 0:
                all_started.set()

    def one(index: int) -> None:
        result, first = results[index], True
        result.started = time.perf_counter()
        try:
            stream = client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": PROMPTS[index]}],
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
                        result.arrivals.append(time.perf_counter())
                        if first:
                            first = False
                            count_started()
                    result.finish_reason = choice.finish_reason or result.finish_reason
        except Exception as exc:  # recorded and asserted on by the test
            result.error = exc
        finally:
            if first:
                count_started()  # failed before any text: nothing to wait for

    with ThreadPoolExecutor(NUM_REQUESTS) as pool:
        futures = [pool.submit(one, i) for i in range(NUM_REQUESTS)]
        if all_started.wait(timeout=300) and on_all_started is not None:
            on_all_started()
        for future in futures:
            future.result()
    client.close()
    return results


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    discovery = tmp_path_factory.mktemp("discovery")
    processes: list[TandemProcess] = []
    try:
        workers = [start_worker(discovery) for _ in range(2)]
        processes += workers
        frontend, url = start_frontend(discovery)
        processes.append(frontend)
        wait_for_workers(url, 2)
        reference = stream_all(url)
        assert all(r.error is None and r.finish_reason == "length" for r in reference), reference
        yield discovery, workers, frontend, url, reference
    finally:
        for process in processes:
            process.stop()


def _report(label: str, results: list[StreamResult]) -> None:
    if not results:
        return
    ttfts = sorted(r.ttft for r in results)
    gaps = sorted(r.max_gap for r in results)
    print(
        f"{label}: {len(results)} streams, TTFT median {ttfts[len(ttfts) // 2]:.2f}s, "
        f"longest inter-chunk gap median {gaps[len(gaps) // 2]:.2f}s max {gaps[-1]:.2f}s"
    )


def test_sigkill_of_a_worker_mid_stream_migrates_every_request(deployment):
    discovery, workers, frontend, url, reference = deployment
    victim = workers[0]
    killed: list[float] = []

    def kill() -> None:
        killed.append(time.perf_counter())
        victim.proc.send_signal(signal.SIGKILL)

    results = stream_all(url, kill)
    assert killed, "the streams never all started"
    assert victim.proc.wait(timeout=10) == -signal.SIGKILL
    for prompt, got, want in zip(PROMPTS, results, reference, strict=True):
        assert got.error is None, f"{prompt}: {got.error!r}\n{frontend.output[-4000:]}"
        assert got.finish_reason == "length", prompt
        assert got.text == want.text, f"{prompt}:\n got: {got.text!r}\nwant: {want.text!r}"
        assert got.completion_tokens == want.completion_tokens == MAX_TOKENS, prompt
    metrics = scrape(url)
    migrated = re.search(rf'tandem_frontend_migrations_total{{model="{MODEL}",outcome="migrated"}} (\S+)', metrics)
    assert migrated is not None and float(migrated.group(1)) > 0, metrics
    assert f'tandem_frontend_migration_limit{{model="{MODEL}"}}' in metrics
    moved = len(re.findall(r"migrating request \S+ off lost worker", frontend.output))
    assert moved == float(migrated.group(1))
    # Streams on the victim waited for the migration: their longest gap spans the kill.
    by_gap = sorted(results, key=lambda r: r.max_gap, reverse=True)
    _report("reference", reference)
    _report(f"migrated (the {moved} of {NUM_REQUESTS} with the longest gap)", by_gap[:moved])
    _report("survivors", by_gap[moved:])


def test_with_migration_off_the_lost_streams_end_with_an_error_event(deployment):
    discovery, workers, frontend, _, reference = deployment
    frontend.stop()  # the first test killed a worker: start a fresh one and a frontend that never migrates
    victim = start_worker(discovery)
    strict, url = start_frontend(discovery, "--migration-limit", "0")
    try:
        wait_for_workers(url, 2)
        results = stream_all(url, lambda: victim.proc.send_signal(signal.SIGKILL))
        failed = [r for r in results if r.error is not None]
        assert failed, "no stream was on the killed worker"
        for result in failed:
            assert isinstance(result.error, openai.APIError), repr(result.error)
            assert re.search(
                r"worker \S+ was lost after \d+ generated tokens .*request migration is off "
                r"\(--migration-limit 0",
                result.error.message,
            ), result.error.message
            assert result.text, "the stream failed before any text"
        for prompt, got, want in zip(PROMPTS, results, reference, strict=True):
            if got.error is None:
                assert got.text == want.text and got.completion_tokens == MAX_TOKENS, prompt
        metrics = scrape(url)
        assert re.search(
            rf'tandem_frontend_migrations_total{{model="{MODEL}",outcome="disabled"}} {len(failed)}\.0', metrics
        ), metrics
        assert f'tandem_frontend_migration_limit{{model="{MODEL}"}} 0.0' in metrics
    finally:
        strict.stop()
        victim.stop()
