"""A vLLM worker on the NATS event plane: the worker relays vLLM's own KV events to NATS, and the
frontend's kv router indexes them from there (`tandem serve --engine vllm --event-plane nats`)."""

from __future__ import annotations

import random
import time

import openai
import pytest
from tests.e2e.serve_process import ServeProcess
from tests.e2e.vllm_reference import BLOCK_SIZE, MODEL, SERVE_ARGS, VLLM_ENV
from tests.support import router_status

pytest.importorskip("vllm")

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_vllm_kv_events_reach_the_router_through_nats(nats_server) -> None:
    serve = ServeProcess(
        *SERVE_ARGS,
        "--port",
        "0",
        "--router",
        "kv",
        "--event-plane",
        "nats",
        "--nats-url",
        nats_server.url,
        env=VLLM_ENV,
        new_session=True,
    )
    try:
        url = serve.wait_ready(timeout=300)

        def status() -> dict:
            return router_status(url)

        (worker,) = status()["workers"].values()
        assert worker["kv_events_address"].startswith("nats://")
        rng = random.Random(5)
        prompt = [rng.randrange(100, 20_000) for _ in range(200)]
        with openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60) as client:
            client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
            deadline = time.monotonic() + 15
            while next(iter(status()["workers"].values()))["blocks_indexed"] < len(prompt) // BLOCK_SIZE:
                assert time.monotonic() < deadline, f"the router indexed nothing from NATS: {status()}"
                time.sleep(0.1)
            again = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
        assert again.usage.prompt_tokens_details.cached_tokens == len(prompt) // BLOCK_SIZE * BLOCK_SIZE
    finally:
        serve.stop()
        serve.kill_group()
    assert "Traceback" not in serve.output, serve.output
