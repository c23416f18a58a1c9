"""KV-aware routing end to end: `tandem serve --router kv` with 4 mocker workers publishing KV
events over ZMQ; repeats land where their blocks are, and a worker without events is flagged."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
import urllib.request

import openai
import pytest
from tests.e2e.serve_process import ServeProcess
from tests.support import router_status

MODEL = "smollm2-135m-instruct"


def _prompt(seed: int, length: int = 160) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000, 30000) for _ in range(length)]


@pytest.fixture(scope="module")
def kv_serve(tmp_path_factory):
    graph = tmp_path_factory.mktemp("kv") / "graph.yaml"
    graph.write_text(
        "frontend: {port: 0, router: kv}\n"
        "workers:\n"
        "  - {engine: mocker, count: 3, flags: {speedup-ratio: 0}}\n"
        "  - {engine: mocker, count: 1, flags: {speedup-ratio: 0, no-kv-events: true}}\n"
    )
    serve = ServeProcess(str(graph))
    try:
        url = serve.wait_ready()
        yield serve, url
    finally:
        serve.stop()


def _served_by(url: str, before: dict) -> str:
    """The worker whose finished-request count went up since ``before`` (a status snapshot)."""
    after = router_status(url)["workers"]
    (worker,) = [w for w, s in after.items() if s["requests_finished"] > before[w]["requests_finished"]]
    return worker


def test_a_repeated_prompt_lands_on_the_worker_that_cached_it(kv_serve):
    serve, url = kv_serve
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    checked = 0
    for seed in range(8):
        prompt = _prompt(seed)
        before = router_status(url)["workers"]
        first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        first_worker = _served_by(url, before)
        if before[first_worker]["kv_events_address"] is None:
            continue  # the router cannot see that worker's cache: nothing to check
        deadline = time.monotonic() + 5  # wait for its BlockStored event to reach the router
        while (
            router_status(url)["workers"][first_worker]["blocks_indexed"] < before[first_worker]["blocks_indexed"] + 10
        ):
            assert time.monotonic() < deadline, "the router never indexed the stored blocks"
            time.sleep(0.05)
        before = router_status(url)["workers"]
        second = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
        assert _served_by(url, before) == first_worker
        # All full blocks but the last: the engine always computes at least the final token.
        assert second.usage.prompt_tokens_details.cached_tokens == 160 - 16
        checked += 1
    assert checked >= 3  # with 3 of 4 workers publishing, most first requests land on one of them
    status = router_status(url)
    assert status["policy"] == "kv" and status["hit_rate"] > 0.2
    published = [s for s in status["workers"].values() if s["kv_events_address"]]
    assert len(published) == 3
    assert all(s["dumps"] >= 1 for s in published)  # each was dumped when discovered
    assert all(s["serves_kv_dump"] and s["index_rebuilds"] == 0 for s in published)
    assert sum(s["events_received"] for s in published) >= checked
    assert sum(s["blocks_indexed"] for s in published) >= 10 * checked


def test_a_worker_without_events_is_flagged_and_warned_about(kv_serve):
    serve, url = kv_serve
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    deadline = time.monotonic() + 60
    seed = 1000
    while time.monotonic() < deadline:
        status = router_status(url)
        silent = [s for s in status["workers"].values() if s["kv_events_address"] is None]
        if silent and silent[0]["events_missing"]:
            break
        client.completions.create(model=MODEL, prompt=_prompt(seed, 40), max_tokens=2, temperature=0)
        seed += 1
    (silent,) = [s for s in router_status(url)["workers"].values() if s["kv_events_address"] is None]
    assert silent["events_missing"] and silent["requests_finished"] >= 2
    assert all(not s["events_missing"] for s in router_status(url)["workers"].values() if s["kv_events_address"])
    assert serve.wait_for_line("has published no KV events", timeout=5)


def test_router_health_is_in_the_prometheus_metrics(kv_serve):
    serve, url = kv_serve
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    assert "tandem_router_hit_rate " in text and "tandem_router_overhead_ms_mean " in text
    indexed = [line for line in text.splitlines() if line.startswith("tandem_router_kv_blocks_indexed{")]
    assert len(indexed) == 4
    missing = [line for line in text.splitlines() if line.startswith("tandem_router_kv_events_missing{")]
    assert sum(float(line.rsplit(" ", 1)[1]) for line in missing) == 1.0  # the worker without events


def _start(argv: list[str], ready: str) -> tuple[subprocess.Popen, str]:
    """Start a tandem process; return it and the line that says it is ready."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tandem", *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if ready in line:
            return proc, line
        assert line or proc.poll() is None, f"{argv[0]} exited early"
    raise AssertionError(f"{argv[0]} not ready")


def test_a_standalone_router_is_shared_by_two_frontends(tmp_path):
    disco = f"file:{tmp_path / 'discovery'}"
    procs = []
    try:
        worker, _ = _start(
            [
                "worker",
                "--engine",
                "mocker",
                "--speedup-ratio",
                "0",
                "--mocker-workers",
                "3",
                "--model",
                MODEL,
                "--discovery",
                disco,
                "--log-level",
                "WARNING",
            ],
            "serving",
        )
        procs.append(worker)
        router, line = _start(["router", "--discovery", disco], "listening on")
        procs.append(router)
        address = line.rsplit(" ", 1)[1].strip()
        urls = []
        for _ in range(2):
            frontend, line = _start(
                ["frontend", "--discovery", disco, "--port", "0", "--router", "remote", "--router-address", address],
                "frontend listening on",
            )
            procs.append(frontend)
            urls.append(line.split(" on ")[1].split()[0])  # http://host:port/v1
        clients = [openai.OpenAI(base_url=url, api_key="x", max_retries=0) for url in urls]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # both frontends see all 3 workers
            try:
                clients[0].completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=1)
                clients[1].completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=1)
                break
            except openai.APIStatusError:
                time.sleep(0.3)
        hits = 0
        for seed in range(5):
            prompt = _prompt(500 + seed)
            clients[0].completions.create(model=MODEL, prompt=prompt, max_tokens=2)
            time.sleep(0.5)  # the worker's KV event reaches the shared router
            again = clients[1].completions.create(model=MODEL, prompt=prompt, max_tokens=2)
            hits += again.usage.prompt_tokens_details.cached_tokens == 160 - 16
        assert hits == 5  # the second frontend's repeat went where the first frontend's request left its KV
    finally:
        for proc in reversed(procs):
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
