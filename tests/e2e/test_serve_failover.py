"""`tandem serve GRAPH.yaml` with two mocker worker processes: a worker killed with SIGKILL is routed
around at once and leaves discovery when its lease runs out; a bad graph file is refused clearly.
Ctrl-C (SIGINT) with a stream in flight: the stream finishes within ``--drain-timeout`` or ends
with an SSE error event, no traceback, exit status 130 (`tandem serve` and `tandem frontend`)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import httpx2 as httpx
import openai
import psutil
import pytest
import yaml
from tests.e2e.serve_process import ServeProcess
from tests.tandem_process import TandemProcess

MODEL = "smollm2-135m-instruct"
TTL_S = 3.0


def health(base_url: str) -> dict:
    return httpx.get(base_url + "/health", timeout=10).json()


def listening_address(proc: psutil.Process) -> set[str]:
    return {f"{c.laddr.ip}:{c.laddr.port}" for c in proc.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}


def test_killed_worker_is_routed_around_and_leaves_health(tmp_path):
    graph = tmp_path / "graph.yaml"
    # The graph gives a short lease; the command line turns its one builtin worker into two mockers.
    graph.write_text(
        yaml.safe_dump(
            {
                "frontend": {"port": 0, "router": "round-robin"},
                "workers": [{"count": 1, "engine": "builtin", "model": MODEL, "flags": {"ttl": TTL_S}}],
            }
        )
    )
    serve = ServeProcess(
        str(graph), "--engine", "mocker", "--speedup-ratio", "0", "--workers", "2", "--drain-timeout", "3"
    )
    try:
        base_url = serve.wait_ready(timeout=120)
        workers = health(base_url)["models"][MODEL]
        assert len(workers) == 2 and {w["engine"] for w in workers} == {"mocker"}
        procs = serve.worker_processes()
        assert len(procs) == 2
        assert all(f"--ttl {TTL_S}" in " ".join(p.cmdline()) for p in procs)

        client = openai.OpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0, timeout=30)

        def complete() -> None:
            r = client.completions.create(
                model=MODEL,
                prompt="Hello there, how are you",
                max_tokens=8,
                temperature=0,
                extra_body={"ignore_eos": True},
            )
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
    assert rc == 130, serve.output


@pytest.mark.parametrize(
    "content, message",
    [
        ("workers:\n  - engine: nope\n", "workers[0].engine must be one of"),
        ("workers: [\n", "is not valid YAML"),
        ("frontend:\n  colour: blue\n", "frontend: unknown keys ['colour']"),
        (None, "cannot read graph"),
    ],
)
def test_bad_graph_exits_2_with_a_clear_message(tmp_path, content, message):
    graph = tmp_path / "graph.yaml"
    if content is not None:
        graph.write_text(content)
    proc = subprocess.run(
        [sys.executable, "-m", "tandem", "serve", str(graph), "--port", "0"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: ") and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


STEP_MS = 10  # every mocker step takes this long: a stream of N tokens lasts about N/100 s


@pytest.mark.parametrize("max_tokens, drain_timeout", [(300, 10), (3000, 2)], ids=["finishes", "cut-off"])
def test_ctrl_c_finishes_or_ends_streams_in_flight_cleanly(tmp_path, max_tokens, drain_timeout):
    graph = tmp_path / "graph.yaml"
    graph.write_text(
        yaml.safe_dump(
            {
                "frontend": {"port": 0},
                "workers": [
                    {
                        "engine": "mocker",
                        "model": MODEL,
                        "flags": {"mocker-prefill-coeffs": [0, 0, STEP_MS], "mocker-decode-coeffs": [0, 0, STEP_MS]},
                    }
                ],
            }
        )
    )
    serve = ServeProcess(str(graph), "--drain-timeout", str(drain_timeout))
    try:
        base_url = serve.wait_ready(timeout=120)
        client = openai.OpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0, timeout=60)
        stream = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Tell me a long story."}],
            max_tokens=max_tokens,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        chunks, finish, error = 0, None, None
        try:
            for chunk in stream:
                chunks += 1
                if chunks == 5:
                    serve.proc.send_signal(signal.SIGINT)
                    stopped_at = time.monotonic()
                if chunk.choices and chunk.choices[0].finish_reason:
                    finish = chunk.choices[0].finish_reason
        except openai.APIError as exc:
            error = exc
        ended_after = time.monotonic() - stopped_at
        rc = serve.proc.wait(timeout=60)
    finally:
        serve.stop()
    if max_tokens < drain_timeout * 1000 / STEP_MS / 2:  # well within the drain timeout
        assert error is None and finish == "length", (error, serve.output)
    else:  # an error event (OpenAI-shaped), not a bare cut (APIConnectionError)
        assert error is not None and not isinstance(error, openai.APIConnectionError), (error, serve.output)
        assert error.code == "server_shutting_down" and error.type == "service_unavailable_error"
        assert drain_timeout - 0.5 < ended_after < drain_timeout + 3, ended_after
    assert rc == 130, serve.output
    assert "stopping" in serve.output and "Traceback" not in serve.output, serve.output


def test_frontend_exits_130_on_ctrl_c(tmp_path):
    frontend = TandemProcess("frontend", "--port", "0", "--discovery", f"file:{tmp_path}")
    try:
        frontend.wait_for(r"frontend listening on", timeout=60)
        frontend.proc.send_signal(signal.SIGINT)
        assert frontend.wait(timeout=30) == 130, frontend.output
        assert "Traceback" not in frontend.output
    finally:
        frontend.kill()
