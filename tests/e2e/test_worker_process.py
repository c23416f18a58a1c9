"""`tandem worker` as a real process: registers in file discovery, serves, drains on SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time

from tests.tiny_models import make_tiny_model

from tandem.runtime.discovery.file import FileDiscovery
from tandem.runtime.request_plane import RequestPlaneClient

PROMPT = list(range(10, 40))


def test_worker_registers_serves_and_drains_on_sigterm(tmp_path):
    model_dir = tmp_path / "model"
    make_tiny_model("llama", model_dir)
    disco_dir = tmp_path / "discovery"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tandem",
            "worker",
            "--model",
            str(model_dir),
            "--discovery",
            f"file:{disco_dir}",
            "--num-kv-blocks",
            "64",
            "--ttl",
            "3",
            "--served-model-name",
            "tiny",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        asyncio.run(asyncio.wait_for(_exercise(disco_dir), 90))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        out = proc.stdout.read()
        assert "serving tiny" in out and "draining" in out
        assert asyncio.run(FileDiscovery(disco_dir).list()) == []
    finally:
        if proc.poll() is None:
            proc.kill()


def test_mocker_worker_serves_without_a_model(tmp_path):
    disco_dir = tmp_path / "discovery"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tandem",
            "worker",
            "--engine",
            "mocker",
            "--speedup-ratio",
            "0",
            "--model",
            "mock-model",
            "--served-model-name",
            "tiny",
            "--discovery",
            f"file:{disco_dir}",
            "--ttl",
            "3",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        asyncio.run(asyncio.wait_for(_exercise(disco_dir), 60))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


async def _exercise(disco_dir) -> None:
    discovery = FileDiscovery(disco_dir)
    deadline = time.monotonic() + 60
    cards = []
    while not cards and time.monotonic() < deadline:
        cards = await discovery.list("tiny")
        await asyncio.sleep(0.2)
    assert cards, "worker never registered"
    client = RequestPlaneClient()
    try:
        payload = {
            "request_id": "r1",
            "token_ids": PROMPT,
            "sampling": {"max_tokens": 5, "temperature": 0.0, "ignore_eos": True},
        }
        deltas = [d async for d in client.stream(cards[0].request_plane_address, "generate", payload)]
        assert sum(len(d["token_ids"]) for d in deltas) == 5
        assert deltas[-1]["finish_reason"] == "length"
    finally:
        await client.close()
        await discovery.close()


def test_several_mocker_workers_share_one_process(tmp_path):
    disco_dir = tmp_path / "discovery"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tandem",
            "worker",
            "--engine",
            "mocker",
            "--speedup-ratio",
            "0",
            "--mocker-workers",
            "3",
            "--model",
            "mock-model",
            "--served-model-name",
            "tiny",
            "--discovery",
            f"file:{disco_dir}",
            "--ttl",
            "3",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:

        async def exercise() -> None:
            discovery = FileDiscovery(disco_dir)
            client = RequestPlaneClient()
            try:
                deadline = time.monotonic() + 60
                cards = []
                while len(cards) < 3 and time.monotonic() < deadline:
                    cards = await discovery.list("tiny")
                    await asyncio.sleep(0.2)
                assert len(cards) == 3
                assert len({c.worker_id for c in cards}) == len({c.request_plane_address for c in cards}) == 3
                for index, card in enumerate(cards):  # each is a worker of its own
                    payload = {"request_id": f"r{index}", "token_ids": PROMPT, "sampling": {"max_tokens": 4}}
                    deltas = [d async for d in client.stream(card.request_plane_address, "generate", payload)]
                    assert sum(len(d["token_ids"]) for d in deltas) == 4
            finally:
                await client.close()
                await discovery.close()

        asyncio.run(asyncio.wait_for(exercise(), 90))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert asyncio.run(FileDiscovery(disco_dir).list()) == []
    finally:
        if proc.poll() is None:
            proc.kill()


def test_prefill_worker_serves_its_transfer_metrics(tmp_path):
    """--metrics-port: the card names the /metrics URL, which shows the held KV export."""
    import urllib.request

    disco_dir = tmp_path / "discovery"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tandem",
            "worker",
            "--engine",
            "mocker",
            "--speedup-ratio",
            "0",
            "--role",
            "prefill",
            "--model",
            "mock-model",
            "--served-model-name",
            "tiny",
            "--discovery",
            f"file:{disco_dir}",
            "--ttl",
            "3",
            "--metrics-port",
            "0",
            "--drain-timeout",
            "3",
        ],  # its export is never pulled: the drain waits 3 s for it
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:

        async def exercise() -> str:
            discovery, client = FileDiscovery(disco_dir), RequestPlaneClient()
            try:
                deadline, cards = time.monotonic() + 60, []
                while not cards and time.monotonic() < deadline:
                    cards = await discovery.list("tiny")
                    await asyncio.sleep(0.2)
                assert cards and cards[0].metrics_address.endswith("/metrics")
                payload = {
                    "request_id": "p1",
                    "token_ids": PROMPT,
                    "export_kv": True,
                    "sampling": {"max_tokens": 1, "temperature": 0.0},
                }
                deltas = [d async for d in client.stream(cards[0].request_plane_address, "generate", payload)]
                assert deltas[-1]["kv_transfer"]["num_blocks"] == len(PROMPT) // 16
                return cards[0].metrics_address
            finally:
                await client.close()
                await discovery.close()

        url = asyncio.run(asyncio.wait_for(exercise(), 90))
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        assert "tandem_kv_transfers_held 1.0" in text and "tandem_kv_transfer_seconds" in text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
