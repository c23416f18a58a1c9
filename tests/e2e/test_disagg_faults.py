"""Disaggregated serving under faults, end to end: `tandem serve examples/graphs/disagg.yaml` (one
prefill and one decode builtin worker on the real SmolLM2-135M-Instruct), the official openai client.

- A client that leaves during the prefill, or while the decode worker pulls the KV blocks, leaves
  nothing behind: no running request, no referenced KV block, no held export on either worker.
- A corrupted or truncated KV transfer is detected by the decode worker, which prefills locally:
  greedy output still equals the aggregated engine's, and no block was imported.
- SIGKILL of the only prefill worker while requests are in flight: every request completes with
  the aggregated output, and later requests are served by the decode worker alone.

One server for the whole module (startup is the expensive part); the tests run in file order and
the prefill worker is killed last. Faults come from the transfer server's test-only hook:
``TANDEM_FAULT_TRANSFER=file:PATH`` makes it read the fault from PATH at each pull, so each test
switches it on a running worker. Worker figures come from their ``stats`` endpoint over the
request plane (addresses from the frontend's /health).
"""

from __future__ import annotations

import asyncio
import random
import re
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx2 as httpx
import openai
import pytest
from tests.e2e.serve_process import ServeProcess

from tandem.engine.config import EngineConfig
from tandem.engine.llm_engine import LLMEngine
from tandem.protocols.sampling_params import SamplingParams
from tandem.runtime.request_plane import RequestPlaneClient

pytestmark = pytest.mark.e2e

# float32 throughout: texts are compared token for token across engines, batchings and KV imports,
# where bfloat16 rounding flips near-ties (tests/e2e/test_engine_bf16_vs_hf.py covers bfloat16).
MODEL = "smollm2-135m-instruct"
GRAPH = Path(__file__).resolve().parents[2] / "examples" / "graphs" / "disagg.yaml"
MAX_TOKENS = 8


def _prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 20_000) for _ in range(length)]


CANCEL_PROMPT = _prompt(1500, seed=101)
FAULT_PROMPTS = {"corrupt": _prompt(300, seed=102), "truncate": _prompt(300, seed=103)}
KILL_PROMPTS = [_prompt(700, seed=110 + i) for i in range(6)]
AFTER_KILL_PROMPT = _prompt(100, seed=120)
REFERENCE_PROMPTS = [*FAULT_PROMPTS.values(), *KILL_PROMPTS, AFTER_KILL_PROMPT]


def _reference_texts() -> dict[tuple[int, ...], str]:
    """Greedy text of every prompt from an aggregated builtin engine in this process."""
    # One step for all prompts: unchunked prefill is the fastest way through them on a CPU.
    engine = LLMEngine(EngineConfig(model=MODEL, dtype="float32", num_kv_blocks=1024, max_num_batched_tokens=8192))
    outputs = engine.generate(REFERENCE_PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))
    return {
        tuple(prompt): engine.loaded.tokenizer.decode(out, skip_special_tokens=True)
        for prompt, out in zip(REFERENCE_PROMPTS, outputs, strict=True)
    }


class Deployment:
    """The running graph: its URL, the fault switch, the reference texts (computed meanwhile)."""

    def __init__(
        self, server: ServeProcess, url: str, fault_file: Path, reference: Future[dict[tuple[int, ...], str]]
    ) -> None:
        self.server, self.url, self.fault_file = server, url, fault_file
        self._reference = reference
        self.client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)

    def fault(self, spec: str) -> None:
        """What the prefill worker's transfer server does to the next pulls ("" = nothing)."""
        self.fault_file.write_text(spec)

    def reference(self, prompt: list[int]) -> str:
        return self._reference.result(timeout=600)[tuple(prompt)]

    def workers(self) -> dict[str, str]:
        """role → request-plane address of the live workers."""
        entries = httpx.get(self.url + "/health", timeout=10).json()["models"][MODEL]
        return {entry["role"]: entry["address"] for entry in entries}

    def metric(self, sample: str) -> float:
        """A sample of the frontend's /metrics (0 before it exists)."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as response:
            text = response.read().decode()
        found = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    def outcomes(self, outcome: str) -> float:
        """The frontend's count of requests that ran with ``outcome`` (disaggregated, fallback...)."""
        return self.metric(f'tandem_frontend_disaggregated_requests_total{{model="{MODEL}",outcome="{outcome}"}}')

    def first_tokens(self) -> float:
        """How many requests got their first token (the frontend's TTFT observations)."""
        return self.metric(f'tandem_frontend_time_to_first_token_seconds_count{{model="{MODEL}"}}')

    def complete(self, prompt: list[int]) -> str:
        out = self.client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True}
        )
        assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == MAX_TOKENS
        return out.choices[0].text


def stats(address: str) -> dict:
    """A worker's ``stats`` (EngineStats plus kv_exports_held and kv_blocks_imported)."""

    async def call() -> dict:
        client = RequestPlaneClient()
        try:
            return await client.call(address, "stats", {}, timeout=10)
        finally:
            await client.close()

    return asyncio.run(call())


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def holds_nothing(address: str) -> bool:
    s = stats(address)
    return (s["num_running"], s["num_waiting"], s["kv_usage"], s["kv_exports_held"]) == (0, 0, 0.0, 0)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    fault_file = tmp_path_factory.mktemp("faults") / "transfer-fault"
    fault_file.write_text("")
    server = ServeProcess(
        str(GRAPH),
        "--port",
        "0",
        "--dtype",
        "float32",
        "--kv-cache-gib",
        "0.5",
        "--drain-timeout",
        "5",
        env={"TANDEM_FAULT_TRANSFER": f"file:{fault_file}"},
    )
    with ThreadPoolExecutor(1) as pool:
        reference = pool.submit(_reference_texts)  # while the workers load
        try:
            url = server.wait_ready(timeout=240)
            deployed = Deployment(server, url, fault_file, reference)
            yield deployed
            deployed.client.close()
        finally:
            server.stop()


# --- a client that leaves leaves nothing behind ---------------------------------------------------------


def test_a_stream_closed_during_the_prefill_leaves_nothing_on_either_worker(deployment):
    workers = deployment.workers()
    before = {role: stats(address) for role, address in workers.items()}
    first_tokens = deployment.first_tokens()
    stream = deployment.client.completions.create(
        model=MODEL,
        prompt=CANCEL_PROMPT,
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    time.sleep(0.5)  # routed to the prefill worker, which computes the prompt in one step of seconds
    stream.close()
    # A worker's stats are a snapshot taken between engine steps: first wait for the prefill step
    # under way to end, then for the abort (handled between steps) to have freed everything.
    steps = before["prefill"]["steps_total"]
    wait_for(lambda: stats(workers["prefill"])["steps_total"] > steps, 120, "the prefill step to end")
    for address in workers.values():
        wait_for(lambda address=address: holds_nothing(address), 30, f"{address} to free everything")
    assert deployment.first_tokens() == first_tokens  # the client was gone before its first token
    after = stats(workers["decode"])
    # The decode half never started: the decode engine saw no prompt and imported nothing.
    assert after["prompt_tokens_total"] == before["decode"]["prompt_tokens_total"]
    assert after["kv_blocks_imported"] == before["decode"]["kv_blocks_imported"]


def test_a_stream_closed_while_the_decode_worker_pulls_leaves_nothing_on_either_worker(deployment):
    workers = deployment.workers()
    decode_before = stats(workers["decode"])
    disaggregated = deployment.outcomes("disaggregated")
    deployment.fault("delay:3")  # every pull waits 3 s on the prefill worker's transfer server
    try:
        stream = deployment.client.completions.create(
            model=MODEL,
            prompt=CANCEL_PROMPT,
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            logprobs=1,
            extra_body={"ignore_eos": True},
        )  # logprobs: the first token's chunk is sent even if its text is empty
        first = next(iter(stream))
        assert first.choices[0].logprobs is not None
        time.sleep(0.5)  # the decode half is now pulling, held up by the delay
        stream.close()
        for address in workers.values():
            wait_for(lambda address=address: holds_nothing(address), 30, f"{address} to free everything")
    finally:
        deployment.fault("")
    assert deployment.outcomes("disaggregated") == disaggregated + 1
    decode_after = stats(workers["decode"])
    # Closed before the pull finished: nothing imported, and the decode engine never ran the request.
    assert decode_after["kv_blocks_imported"] == decode_before["kv_blocks_imported"]
    assert decode_after["prompt_tokens_total"] == decode_before["prompt_tokens_total"]


# --- a bad transfer is detected and the decode worker prefills locally -----------------------------------


@pytest.mark.parametrize("fault", ["corrupt", "truncate"])
def test_a_bad_transfer_is_detected_and_the_decode_worker_prefills_locally(deployment, fault):
    prompt = FAULT_PROMPTS[fault]
    decode = deployment.workers()["decode"]
    imported, disaggregated = stats(decode)["kv_blocks_imported"], deployment.outcomes("disaggregated")
    deployment.fault(fault)
    try:
        text = deployment.complete(prompt)
    finally:
        deployment.fault("")
    assert text == deployment.reference(prompt)
    assert deployment.outcomes("disaggregated") == disaggregated + 1  # it did go through a transfer
    assert stats(decode)["kv_blocks_imported"] == imported  # which failed: the decode worker prefilled it


# --- the only prefill worker dies with requests in flight (keep last: it kills the prefill worker) -------


def test_sigkill_of_the_only_prefill_worker_fails_no_request(deployment):
    [victim] = [p for p in deployment.server.worker_processes() if "prefill" in p.cmdline()]
    fallbacks = deployment.outcomes("fallback")

    async def scenario() -> list[str]:
        first_token = asyncio.Event()
        async with openai.AsyncOpenAI(
            base_url=deployment.url + "/v1", api_key="x", max_retries=0, timeout=300
        ) as client:

            async def one(prompt: list[int]) -> str:
                stream = await client.completions.create(
                    model=MODEL,
                    prompt=prompt,
                    max_tokens=MAX_TOKENS,
                    temperature=0,
                    stream=True,
                    logprobs=1,
                    extra_body={"ignore_eos": True},
                )
                text, finish = "", None
                async for chunk in stream:
                    first_token.set()
                    text += chunk.choices[0].text
                    finish = chunk.choices[0].finish_reason or finish
                assert finish == "length"
                return text

            requests = [asyncio.ensure_future(one(prompt)) for prompt in KILL_PROMPTS]
            await asyncio.wait_for(first_token.wait(), 240)  # one prefill done; the others still running
            victim.kill()
            return await asyncio.wait_for(asyncio.gather(*requests), 300)

    texts = asyncio.run(scenario())
    victim.wait(10)
    assert texts == [deployment.reference(prompt) for prompt in KILL_PROMPTS]
    # The kill hit prefills in flight: at least one request had to run whole on the decode worker.
    assert deployment.outcomes("fallback") >= fallbacks + 1
    assert deployment.complete(AFTER_KILL_PROMPT) == deployment.reference(AFTER_KILL_PROMPT)  # still served
