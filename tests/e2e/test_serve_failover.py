"""`tandem serve GRAPH.yaml` with two mocker worker processes: a worker killed with SIGKILL is routed
around at once and leaves discovery when its lease runs out; a bad graph file is refused clearly."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx2 as httpx
import openai
import psutil
import pytest
import yaml
from tests.e2e.serve_process import ServeProcess

MODEL = "smollm2-135m-instruct"
TTL_S = 3.0


def health(base_url: str) -> dict:
    return httpx.get(base_url + "/health", timeout=10).json()


def listening_address(proc: psutil.Process) -> set[str]:
    return {f"{c.laddr.ip}:{c.laddr.port}" for c in proc.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}


def test_killed_worker_is_routed_around_and_leaves_health(tmp_path):
    graph = tmp_path / "graph.yaml"
    # The graph gives a short lease; the command line turns its one builtin worker into two mockers.
    graph.write_text(yaml.safe_dump({
        "frontend": {"port": 0, "router": "round-robin"},
        "workers": [{"count": 1, "engine": "builtin", "model": MODEL, "flags": {"ttl": TTL_S}}],
    }))
    serve = ServeProcess(str(graph), "--engine", "mocker", "--speedup-ratio", "0", "--workers", "2",
                         "--drain-timeout", "3")
    try:
        base_url = serve.wait_ready(timeout=120)
        workers = health(base_url)["models"][MODEL]
        assert len(workers) == 2 and {w["engine"] for w in workers} == {"mocker"}
        procs = serve.worker_processes()
        assert len(procs) == 2
        assert all(f"--ttl {TTL_S}" in " ".join(p.cmdline()) for p in procs)

        client = openai.OpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0, timeout=30)

        def complete() -> None:
            r = client.completions.create(model=MODEL, prompt="Hello there, how are you", max_tokens=8,
                                          temperature=0, extra_body={"ignore_eos": True})
            assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 8

        for _ in range(4):  # round-robin: both workers serve
            complete()

        victim, survivor = procs
        # Workers also listen for KV events (ZMQ PUB and replay): keep their request-plane ports.
        served = {w["address"] for w in workers}
        victim_address, survivor_address = listening_address(victim) & served, listening_address(survivor) & served
        assert len(victim_address) == len(survivor_address) == 1
        assert served == victim_address | survivor_address
        [victim_id] = [w["worker_id"] for w in workers if w["address"] in victim_address]
        victim.kill()
        killed_at = time.monotonic()

        for _ in range(10):  # requests routed to the dead worker are retried on the survivor
            complete()

        def addresses() -> set[str]:
            return {w["address"] for w in health(base_url)["models"][MODEL]}

        while addresses() != survivor_address:
            assert time.monotonic() - killed_at < TTL_S + 3, f"dead worker still in /health: {health(base_url)}"
            time.sleep(0.2)
        # Past the frontend's own 5 s blacklist, the dead worker stays gone: its lease expired.
        time.sleep(max(0.0, killed_at + 6.5 - time.monotonic()))
        assert addresses() == survivor_address
        assert health(base_url)["status"] == "ready"
        complete()
        assert serve.wait_for_line(f"worker process {victim.pid} exited", timeout=5), serve.output
        # Round-robin sent some of the 10 to the dead worker: the frontend marked it down and retried.
        assert f"worker {victim_id} unavailable" in serve.output, serve.output
        client.close()
    finally:
        rc = serve.stop()
    assert rc == 0, serve.output


@pytest.mark.parametrize("content, message", [
    ("workers:\n  - engine: nope\n", "workers[0].engine must be one of"),
    ("workers: [\n", "is not valid YAML"),
    ("frontend:\n  colour: blue\n", "frontend: unknown keys ['colour']"),
    (None, "cannot read graph"),
])
def test_bad_graph_exits_2_with_a_clear_message(tmp_path, content, message):
    graph = tmp_path / "graph.yaml"
    if content is not None:
        graph.write_text(content)
    proc = subprocess.run([sys.executable, "-m", "tandem", "serve", str(graph), "--port", "0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: ") and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
