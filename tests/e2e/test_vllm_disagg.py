"""Disaggregated serving on vLLM workers end to end: `tandem serve examples/graphs/disagg_vllm.yaml`
(one prefill and one decode vLLM worker, vLLM's CPU build, the real SmolLM2-135M-Instruct),
driven by the official openai client.

Greedy outputs must equal vLLM's own ``LLM.generate`` on the same token ids (the aggregated
answer); the decode worker's ``kv_blocks_imported`` must grow by the prompt's full blocks (the KV
was pulled through Tandem's vLLM KV connector, not recomputed); a pull that fails (the prefill
worker's transfer server corrupts its payload) falls back to a local prefill with the same text.
"""

from __future__ import annotations

import random
import re
import time
import urllib.request
from pathlib import Path

import openai
import pytest
from tests.e2e.serve_process import ServeProcess
from tests.e2e.vllm_reference import BLOCK_SIZE, MODEL, VLLM_ENV, Prompts, VllmReference

pytest.importorskip("vllm")

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

GRAPH = Path(__file__).resolve().parents[2] / "examples" / "graphs" / "disagg_vllm.yaml"
MAX_TOKENS = 8
LENGTHS = (10, 100, 700)
"""Prompt lengths: 10 runs whole on the decode worker (below max_local_prefill_length, 64)."""
FALLBACK_LENGTH = 300
STATS_SETTLE_S = 5.0
"""The frontend refreshes its worker metrics every 2 s (worker_stats_interval_s), and vLLM reports
connector stats with the step after a load: a figure is read once it has had this long."""


def _prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 20_000) for _ in range(length)]


PROMPTS = {length: _prompt(length, seed=length) for length in (*LENGTHS, FALLBACK_LENGTH)}


@pytest.fixture(scope="module")
def fault_file(tmp_path_factory) -> Path:
    """The prefill worker's transfer server reads its fault from here at every pull (empty: none)."""
    path = tmp_path_factory.mktemp("faults") / "transfer"
    path.write_text("")
    return path


@pytest.fixture(scope="module")
def served(fault_file):
    """(openai client, base URL, reference outputs by prompt length)."""
    requests = [{"prompt_token_ids": ids, "max_tokens": MAX_TOKENS, "ignore_eos": True} for ids in PROMPTS.values()]
    reference = VllmReference(requests)  # loads vLLM while the server boots
    server = ServeProcess(
        str(GRAPH),
        "--port",
        "0",
        "--drain-timeout",
        "5",
        env={**VLLM_ENV, "TANDEM_FAULT_TRANSFER": f"file:{fault_file}"},
        new_session=True,
    )
    try:
        url = server.wait_ready(timeout=300)
        outputs = reference.result()
        tokenizer = Prompts()
        texts = {
            length: tokenizer.greedy(request, output).text
            for length, request, output in zip(PROMPTS, requests, outputs)
        }
        with openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120) as client:
            yield client, url, texts
    finally:
        reference.close()
        server.stop()
        server.kill_group()


def _metric(url: str, name: str, **labels: str) -> float:
    """Sum of a Prometheus sample over every series matching ``labels``."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    total = 0.0
    for match in re.finditer(rf"^{name}{{([^}}]*)}} (\S+)$", text, re.MULTILINE):
        series = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
        if all(series.get(key) == value for key, value in labels.items()):
            total += float(match.group(2))
    return total


def _disaggregated(url: str) -> float:
    return _metric(url, "tandem_frontend_disaggregated_requests_total", model=MODEL, outcome="disaggregated")


def _imported(url: str) -> float:
    return _metric(url, "tandem_worker_kv_blocks_imported", model=MODEL)


def _imported_reaches(url: str, expected: float) -> float:
    """The imported-blocks figure once it reaches ``expected`` (or whatever it is after STATS_SETTLE_S)."""
    deadline = time.monotonic() + STATS_SETTLE_S
    while (value := _imported(url)) < expected and time.monotonic() < deadline:
        time.sleep(0.2)
    return value


def _complete(client: openai.OpenAI, length: int) -> openai.types.Completion:
    return client.completions.create(
        model=MODEL, prompt=PROMPTS[length], max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True}
    )


@pytest.mark.parametrize("length", LENGTHS)
def test_greedy_output_equals_vllm_and_the_kv_is_pulled(served, length):
    client, url, texts = served
    disaggregated, imported = _disaggregated(url), _imported(url)
    out = _complete(client, length)
    assert out.choices[0].text == texts[length]
    assert out.usage.prompt_tokens == length and out.usage.completion_tokens == MAX_TOKENS
    if length > 64:  # above max_local_prefill_length: two halves, the prompt's full blocks pulled
        assert _disaggregated(url) - disaggregated == 1
        assert _imported_reaches(url, imported + length // BLOCK_SIZE) - imported == length // BLOCK_SIZE
    else:  # whole on the decode worker
        assert _disaggregated(url) == disaggregated
        time.sleep(STATS_SETTLE_S)
        assert _imported(url) == imported


def test_a_failed_pull_falls_back_to_a_local_prefill(served, fault_file):
    client, url, texts = served
    time.sleep(STATS_SETTLE_S)  # earlier tests' figures have arrived
    imported = _imported(url)
    fault_file.write_text("corrupt")  # the decode worker's checksum check refuses the payload
    try:
        out = _complete(client, FALLBACK_LENGTH)
    finally:
        fault_file.write_text("")
    assert out.choices[0].text == texts[FALLBACK_LENGTH]
    time.sleep(STATS_SETTLE_S)
    assert _imported(url) == imported  # nothing loaded: vLLM recomputed the blocks
