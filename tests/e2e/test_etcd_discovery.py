"""etcd discovery with real processes: two mocker workers and a frontend on a real etcd. A
SIGKILLed worker leaves /health when its lease runs out; the frontend serves throughout an etcd
outage; an etcd that comes back empty gets the surviving worker re-registered."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import socket
import time
import urllib.error
import urllib.request

import openai
from tests.infra_servers import EtcdServer
from tests.support import free_port
from tests.tandem_process import TandemProcess

from tandem.runtime.discovery.etcd import DiscoveryUnavailableError, EtcdDiscovery

MODEL = "smollm2-135m-instruct"
TTL_S = 3.0


def health(base_url: str) -> dict:
    try:
        with urllib.request.urlopen(base_url + "/health", timeout=10) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:  # 503 while no worker serves
        return json.load(exc)


def worker_ids(base_url: str) -> set[str]:
    return {w["worker_id"] for w in health(base_url)["models"].get(MODEL, [])}


def etcd_worker_ids(endpoint: str) -> set[str]:
    async def read() -> set[str]:
        client = EtcdDiscovery(endpoint)
        try:
            return {card.worker_id for card in await client.list(MODEL)}
        finally:
            await client.close()

    return asyncio.run(read())


def etcd_shows(endpoint: str, expected: set[str]) -> bool:
    try:
        return etcd_worker_ids(endpoint) == expected
    except DiscoveryUnavailableError:  # etcd still starting
        return False


def wait_until(predicate, timeout: float, what: str, *procs: TandemProcess) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what} not within {timeout}s\n" + "\n----\n".join(p.output for p in procs))
        time.sleep(0.1)
    return time.monotonic() - start


def test_workers_and_frontend_on_etcd(etcd_server: EtcdServer) -> None:
    endpoint = etcd_server.endpoint
    etcd_flags = ("--discovery", "etcd", "--etcd-endpoints", endpoint)
    worker_flags = (
        "worker",
        "--engine",
        "mocker",
        "--speedup-ratio",
        "0",
        "--model",
        MODEL,
        "--ttl",
        str(TTL_S),
        *etcd_flags,
    )
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    victim, survivor = TandemProcess(*worker_flags), TandemProcess(*worker_flags)
    procs = [victim, survivor]
    frontend = TandemProcess("frontend", "--port", str(port), "--router", "round-robin", *etcd_flags)
    procs.append(frontend)
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0, timeout=30)

    def complete() -> None:
        r = client.completions.create(
            model=MODEL, prompt="Hello there, how are you", max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
        )
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 8

    def frontend_up() -> bool:
        try:
            return len(worker_ids(base_url)) == 2
        except OSError:
            return False

    try:
        wait_until(frontend_up, 120, "both workers in /health", *procs)
        for _ in range(4):  # round-robin: both serve
            complete()
        registered = etcd_worker_ids(endpoint)
        assert registered == worker_ids(base_url)
        host = socket.gethostname()
        [victim_id] = [w for w in registered if w.startswith(f"{host}-{victim.proc.pid}-")]
        [survivor_id] = registered - {victim_id}

        # SIGKILL: no withdrawal, the lease expires. No requests meanwhile, so the frontend's own
        # blacklist of failing workers plays no part: this is discovery alone.
        victim.proc.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        victim.proc.wait(timeout=10)
        wait_until(lambda: worker_ids(base_url) == {survivor_id}, TTL_S + 2.0, "victim gone from /health", *procs)
        removal_s = time.monotonic() - killed_at
        print(f"SIGKILL -> gone from /health: {removal_s:.2f}s (TTL {TTL_S}s)")
        assert removal_s <= TTL_S + 2.0
        for _ in range(3):
            complete()

        # etcd goes away for longer than a lease TTL: the frontend keeps serving the worker it knows.
        etcd_server.kill()
        down_until = time.monotonic() + TTL_S + 1.0
        while time.monotonic() < down_until:
            complete()
            assert worker_ids(base_url) == {survivor_id}
            time.sleep(0.2)

        # etcd comes back without its data: the surviving worker registers again on its own.
        shutil.rmtree(etcd_server.data_dir / "data")
        etcd_server.start()
        back = wait_until(lambda: etcd_shows(endpoint, {survivor_id}), 10, "re-registration", *procs)
        print(f"survivor re-registered {back:.2f}s after etcd restarted empty")
        for _ in range(3):
            complete()
        assert worker_ids(base_url) == {survivor_id}

        # The frontend follows the new etcd: a worker started now appears in /health.
        procs.append(TandemProcess(*worker_flags))
        wait_until(lambda: len(worker_ids(base_url)) == 2, 60, "new worker in /health", *procs)
        for _ in range(4):
            complete()
        assert etcd_worker_ids(endpoint) == worker_ids(base_url)
    finally:
        client.close()
        for proc in procs:
            proc.stop()
    assert "Traceback" not in frontend.output, frontend.output
    # One etcd outage, logged once by each process that lived through it (not once per retry).
    for proc in (frontend, survivor):
        assert proc.output.count("etcd unreachable at") == 1, proc.output
        assert proc.output.count("etcd reachable again at") == 1, proc.output


def test_processes_started_before_etcd_wait_for_it(tmp_path) -> None:
    etcd = EtcdServer(tmp_path / "etcd")  # not running yet
    etcd_flags = ("--discovery", "etcd", "--etcd-endpoints", etcd.endpoint)
    worker_flags = ("worker", "--engine", "mocker", "--speedup-ratio", "0", "--model", MODEL, *etcd_flags)
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    worker = TandemProcess(*worker_flags, "--discovery-wait", "60")
    impatient = TandemProcess(*worker_flags, "--discovery-wait", "1")
    frontend = TandemProcess("frontend", "--port", str(port), *etcd_flags)
    procs = [worker, impatient, frontend]
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0, timeout=30)
    try:
        # Without etcd, a worker with a short --discovery-wait gives up with a clear error and exit 1.
        assert impatient.wait(60) == 1, impatient.output
        assert "could not register in discovery within 1s" in impatient.output, impatient.output
        assert "Traceback" not in impatient.output, impatient.output
        # The frontend is up and serves /health (no workers yet); the patient worker still waits.
        wait_until(lambda: _answers(base_url), 120, "frontend /health", *procs)
        assert worker_ids(base_url) == set() and worker.proc.poll() is None
        etcd.start()
        took = wait_until(lambda: len(worker_ids(base_url)) == 1, 30, "worker in /health once etcd is up", *procs)
        print(f"worker in /health {took:.2f}s after etcd started")
        r = client.completions.create(
            model=MODEL, prompt="Hello", max_tokens=4, temperature=0, extra_body={"ignore_eos": True}
        )
        assert r.usage.completion_tokens == 4
    finally:
        client.close()
        for proc in procs:
            proc.stop()
        etcd.kill()
    assert "Traceback" not in frontend.output + worker.output


def _answers(base_url: str) -> bool:
    try:
        health(base_url)
        return True
    except OSError:
        return False
