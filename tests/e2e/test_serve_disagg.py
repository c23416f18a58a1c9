"""Disaggregated serving end to end: `tandem serve examples/graphs/disagg*.yaml` (one prefill and
one decode builtin worker on the real SmolLM2-135M-Instruct), driven by the official openai client.

Greedy outputs must equal the aggregated builtin engine's (run in this process on the same token
ids), for prompts of 10 to 1,500 tokens, including a prompt whose prefix the decode worker
already holds (it pulls only the rest).
"""

from __future__ import annotations

import random
import re
import urllib.request
from pathlib import Path

import openai
import pytest
from tests.e2e.serve_process import ServeProcess

from tandem.engine.config import EngineConfig
from tandem.engine.llm_engine import LLMEngine
from tandem.protocols.sampling_params import SamplingParams

pytestmark = pytest.mark.e2e

# float32 throughout: texts are compared token for token across engines, batchings and KV imports,
# where bfloat16 rounding flips near-ties (tests/e2e/test_engine_bf16_vs_hf.py covers bfloat16).
MODEL = "smollm2-135m-instruct"
GRAPHS = Path(__file__).resolve().parents[2] / "examples" / "graphs"
MAX_TOKENS = 8


def _prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 20_000) for _ in range(length)]


@pytest.fixture(scope="module")
def reference():
    return LLMEngine(EngineConfig(model=MODEL, dtype="float32", num_kv_blocks=512))


def _disaggregated(client: openai.OpenAI) -> float:
    """The frontend's count of requests served in two halves (from /metrics)."""
    url = str(client.base_url).rstrip("/").removesuffix("/v1") + "/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    pattern = rf'^tandem_frontend_disaggregated_requests_total{{model="{MODEL}",outcome="disaggregated"}} (\S+)$'
    found = re.search(pattern, text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def _greedy(engine: LLMEngine, prompt: list[int]) -> list[int]:
    return engine.generate([prompt], SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))[0]


@pytest.fixture(scope="module", params=["disagg.yaml", "disagg_router.yaml"])
def client(request, reference):
    server = ServeProcess(
        str(GRAPHS / request.param),
        "--port",
        "0",
        "--dtype",
        "float32",
        "--kv-cache-gib",
        "0.5",
        "--drain-timeout",
        "5",
    )
    try:
        url = server.wait_ready(timeout=180)
        with openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120) as c:
            yield c
    finally:
        server.stop()


@pytest.mark.parametrize("length", [10, 100, 700, 1500])
def test_greedy_output_equals_aggregated(client, reference, length):
    prompt = _prompt(length, seed=length)
    before = _disaggregated(client)
    out = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True}
    )
    assert out.choices[0].text == reference.loaded.tokenizer.decode(
        _greedy(reference, prompt), skip_special_tokens=True
    )
    assert out.usage.prompt_tokens == length and out.usage.completion_tokens == MAX_TOKENS
    # Above max_local_prefill_length (64) it ran in two halves; the 10-token prompt ran on the decode worker.
    assert _disaggregated(client) - before == (1 if length > 64 else 0)


def test_a_prompt_partly_cached_on_the_decode_worker_equals_aggregated(client, reference):
    head = _prompt(400, seed=7)
    client.completions.create(model=MODEL, prompt=head, max_tokens=2, temperature=0)  # leaves head's KV on decode
    prompt = head + _prompt(300, seed=8)
    out = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True}
    )
    assert out.choices[0].text == reference.loaded.tokenizer.decode(
        _greedy(reference, prompt), skip_special_tokens=True
    )
