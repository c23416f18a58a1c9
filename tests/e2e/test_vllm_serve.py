"""`tandem serve --engine vllm` end to end on the real SmolLM2-135M-Instruct, driven by the
official openai client.

One server for the module (frontend + one vLLM worker: float32, eager, 32-token blocks, context
2048). Greedy outputs are compared with vLLM's own offline ``LLM.generate`` on the same prompt
token ids (tests/e2e/vllm_reference.py, run in a child process while the server boots): Tandem's
frontend and request plane in front of vLLM must not change a single token or character, for
chat and completions, streaming or not. Then: prefix-cache usage on a repeat, stop strings, a
closed stream aborting vLLM's request, context-length errors, and a clean stop that leaves no
vLLM engine core behind.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from typing import Any

import httpx2 as httpx
import openai
import psutil
import pytest
from tests.e2e.serve_process import ServeProcess
from tests.e2e.vllm_reference import (
    BLOCK_SIZE,
    MAX_MODEL_LEN,
    MODEL,
    SERVE_ARGS,
    VLLM_ENV,
    Greedy,
    Prompts,
    VllmReference,
)
from tests.support import worker_stats

from tandem.runtime.request_plane import RemoteError, RequestPlaneClient

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

VARIANTS = ("sync", "sync-stream", "async", "async-stream")
CHAT_CASES = [  # (question, max_tokens): the first runs into max_tokens, the second ends with EOS (so do these)
    ("Explain in two sentences why the sky is blue.", 10),
    ("What is the capital of France?", 20),
]
COMPLETION_CASES = [
    ("The capital of France is", 10),
    ("My favourite colour is", 16),
]
STOP_PROMPT = ("Once upon a time", 24)
LONG_PROMPT = (
    "The lighthouse keeper wrote in his log every evening: the wind, the colour of the sea, the "
    "ships that passed, the birds that rested on the gallery rail, and the slow turning of the "
    "great lamp above him. On the third night of the storm, when the waves broke over the rocks "
    "and the rain hammered on the glass, the radio crackled with a voice he had not heard in "
    "twenty years, calling the old name of the island from a boat he could not see. He put down "
    "his tea, looked out into the dark, and wrote"
)


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def serve():
    server = ServeProcess("--port", "0", *SERVE_ARGS, "--drain-timeout", "5", env=VLLM_ENV, new_session=True)
    try:
        yield server
    finally:
        server.stop()
        server.kill_group()  # nothing of it survives the module, whatever failed


class Reference:
    """vLLM's own greedy outputs for every case of this module, by (kind, text, max_tokens)."""

    def __init__(self) -> None:
        self.prompts = Prompts()
        self.tok = self.prompts.tok
        cases = [("chat", q, n) for q, n in CHAT_CASES] + [("completion", p, n) for p, n in COMPLETION_CASES]
        cases += [("completion", *STOP_PROMPT), ("chat", CHAT_CASES[0][0], 16), ("completion", LONG_PROMPT, 8)]
        cases += [("chat", LONG_PROMPT, 6)]
        requests = [{"prompt_token_ids": self.ids(kind, text), "max_tokens": n} for kind, text, n in cases]
        runner = VllmReference(requests)  # loads vLLM while the server boots
        try:
            outputs = runner.result()
        finally:
            runner.close()
        self.cases = {case: self.prompts.greedy(r, o) for case, r, o in zip(cases, requests, outputs, strict=True)}

    def ids(self, kind: str, text: str) -> list[int]:
        return self.prompts.chat_ids(text) if kind == "chat" else self.prompts.completion_ids(text)

    def chat(self, question: str, max_tokens: int) -> Greedy:
        return self.cases[("chat", question, max_tokens)]

    def completion(self, prompt: str, max_tokens: int) -> Greedy:
        return self.cases[("completion", prompt, max_tokens)]


@pytest.fixture(scope="module")
def ref(serve):  # started after the server, so both boot at once
    return Reference()


@pytest.fixture(scope="module")
def base_url(serve, ref):
    return serve.wait_ready(timeout=180)


@pytest.fixture(scope="module")
def client(base_url):
    with openai.OpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0, timeout=120) as c:
        yield c


def async_client(base_url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0, timeout=120)


# --- helpers ------------------------------------------------------------------------------------


@dataclass
class Result:
    text: str
    finish_reason: str | None
    usage: Any


def _collect(chunks: list, chat: bool) -> Result:
    """Text, the one finish_reason and the trailing usage chunk's usage of a stream."""
    choice_chunks = [c for c in chunks if c.choices]
    if chat:
        assert choice_chunks[0].choices[0].delta.role == "assistant"
    text = "".join((c.choices[0].delta.content or "") if chat else c.choices[0].text for c in choice_chunks)
    finishes = [c.choices[0].finish_reason for c in choice_chunks if c.choices[0].finish_reason]
    assert len(finishes) == 1 and choice_chunks[-1].choices[0].finish_reason == finishes[0]
    assert all(c.usage is None for c in chunks[:-1])
    usage = chunks[-1].usage
    if usage is not None:
        assert chunks[-1].choices == []
    return Result(text, finishes[0], usage)


def run_request(variant: str, base_url: str, client: openai.OpenAI, chat: bool, **kwargs: Any) -> Result:
    """One request through the client path ``variant`` (the async streams ask for usage)."""
    kwargs = {"model": MODEL, **kwargs}
    if variant.endswith("stream"):
        kwargs["stream"] = True
        if variant.startswith("async"):
            kwargs["stream_options"] = {"include_usage": True}

    def full(r: Any) -> Result:
        choice = r.choices[0]
        return Result(choice.message.content if chat else choice.text, choice.finish_reason, r.usage)

    if variant.startswith("sync"):
        api = client.chat.completions if chat else client.completions
        response = api.create(**kwargs)
        return _collect(list(response), chat) if variant == "sync-stream" else full(response)

    async def run_async() -> Result:
        async with async_client(base_url) as ac:
            api = ac.chat.completions if chat else ac.completions
            response = await api.create(**kwargs)
            return _collect([c async for c in response], chat) if variant == "async-stream" else full(response)

    return asyncio.run(run_async())


def assert_matches(result: Result, expected: Greedy, variant: str) -> None:
    assert result.text == expected.text
    assert result.finish_reason == expected.finish_reason
    if variant == "sync-stream":
        assert result.usage is None  # no stream_options: no usage chunk
        return
    assert result.usage.prompt_tokens == len(expected.prompt_ids)  # the same prompt as vLLM's
    assert result.usage.completion_tokens == len(expected.output_ids)
    assert result.usage.total_tokens == len(expected.prompt_ids) + len(expected.output_ids)


def worker_address(base_url: str) -> str:
    [worker] = httpx.get(base_url + "/health", timeout=10).json()["models"][MODEL]
    return worker["address"]


def metric(base_url: str, name: str) -> float | None:
    """The value of a one-series metric of the frontend's /metrics (None when absent)."""
    text = httpx.get(base_url + "/metrics", timeout=10).text
    match = re.search(rf"^{name}{{[^}}]*}} (\S+)$", text, re.M)
    return float(match.group(1)) if match else None


# --- the worker ---------------------------------------------------------------------------------


def test_health_lists_the_vllm_worker(base_url):
    [worker] = httpx.get(base_url + "/health", timeout=10).json()["models"][MODEL]
    assert (worker["engine"], worker["role"], worker["context_length"]) == ("vllm", "agg", MAX_MODEL_LEN)
    deadline = time.monotonic() + 10  # stats are polled every 2 s
    while worker["stats"] is None and time.monotonic() < deadline:
        time.sleep(0.2)
        [worker] = httpx.get(base_url + "/health", timeout=10).json()["models"][MODEL]
    stats = worker["stats"]
    assert stats is not None and stats["num_total_blocks"] > 0 and stats["num_running"] == 0
    # vLLM's pool: 1 GiB of float32 KV for SmolLM2 (30 layers, 3 KV heads of 64) is 728 blocks of 32.
    assert stats["num_total_blocks"] == (1 << 30) // (BLOCK_SIZE * 30 * 2 * 3 * 64 * 4)
    models = httpx.get(base_url + "/v1/models", timeout=10).json()
    assert [(m["id"], m["max_model_len"]) for m in models["data"]] == [(MODEL, MAX_MODEL_LEN)]


# --- greedy parity with vLLM's LLM.generate through every client path ------------------------------


def test_reference_cases_cover_both_finish_reasons(ref):
    assert {ref.chat(q, n).finish_reason for q, n in CHAT_CASES} == {"stop", "length"}
    assert {ref.completion(p, n).finish_reason for p, n in COMPLETION_CASES} == {"stop", "length"}
    assert ref.chat(*CHAT_CASES[1]).text == "The capital of France is Paris."


@pytest.mark.parametrize("variant", VARIANTS)
def test_chat_greedy_matches_vllm(variant, base_url, client, ref):
    for question, max_tokens in CHAT_CASES:
        messages = [{"role": "user", "content": question}]
        result = run_request(variant, base_url, client, True, messages=messages, max_tokens=max_tokens, temperature=0)
        assert_matches(result, ref.chat(question, max_tokens), variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_completion_greedy_matches_vllm(variant, base_url, client, ref):
    for prompt, max_tokens in COMPLETION_CASES:
        result = run_request(variant, base_url, client, False, prompt=prompt, max_tokens=max_tokens, temperature=0)
        assert_matches(result, ref.completion(prompt, max_tokens), variant)


def test_logprob_tokens_are_vllms_token_ids(client, ref):
    """Token by token: the logprobs name the tokens vLLM's LLM.generate chose, each its own top-1."""
    question, max_tokens = CHAT_CASES[0]
    expected = ref.chat(question, max_tokens)
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": question}],
        max_tokens=max_tokens,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = r.choices[0].logprobs.content
    assert [lp.token for lp in content] == [ref.tok.decode([t]) for t in expected.output_ids]
    for lp in content:
        assert lp.logprob <= 0 and len(lp.top_logprobs) == 2
        assert lp.top_logprobs[0].token == lp.token and lp.top_logprobs[0].logprob == pytest.approx(lp.logprob)

    # Completions with the prompt given as token ids, legacy logprobs.
    prompt, max_tokens = STOP_PROMPT
    expected = ref.completion(prompt, max_tokens)
    r = client.completions.create(
        model=MODEL, prompt=expected.prompt_ids, max_tokens=max_tokens, temperature=0, logprobs=1
    )
    assert r.choices[0].text == expected.text and r.usage.prompt_tokens == len(expected.prompt_ids)
    assert r.choices[0].logprobs.tokens == [ref.tok.decode([t]) for t in expected.output_ids]


# --- prefix cache -----------------------------------------------------------------------------------


def test_a_repeat_reports_cached_tokens(base_url, client, ref):
    expected = ref.completion(LONG_PROMPT, 8)
    n = len(expected.prompt_ids)
    assert n >= 3 * BLOCK_SIZE
    address = worker_address(base_url)
    before = asyncio.run(worker_stats(address))
    first = client.completions.create(model=MODEL, prompt=LONG_PROMPT, max_tokens=8, temperature=0)
    assert first.choices[0].text == expected.text
    assert first.usage.prompt_tokens_details.cached_tokens == 0  # a prompt never seen before

    result = run_request("async-stream", base_url, client, False, prompt=LONG_PROMPT, max_tokens=8, temperature=0)
    assert_matches(result, expected, "async-stream")
    # vLLM reuses the prompt's whole blocks but always computes its last token.
    assert result.usage.prompt_tokens_details.cached_tokens == (n - 1) // BLOCK_SIZE * BLOCK_SIZE > 0

    chat = ref.chat(LONG_PROMPT, 6)
    cached = []
    for _ in range(2):
        r = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": LONG_PROMPT}], max_tokens=6, temperature=0
        )
        assert r.choices[0].message.content == chat.text
        cached.append(r.usage.prompt_tokens_details.cached_tokens)
    # The first may hit the chat template's system prompt, left by earlier chats; the repeat hits it all.
    assert cached[0] < cached[1] == (len(chat.prompt_ids) - 1) // BLOCK_SIZE * BLOCK_SIZE

    # The worker's stats (vLLM's stat logger) count the same cached prompt tokens.
    after = asyncio.run(worker_stats(address))
    reported = result.usage.prompt_tokens_details.cached_tokens + sum(cached)
    assert after["cached_prompt_tokens_total"] - before["cached_prompt_tokens_total"] == reported
    assert after["prompt_tokens_total"] - before["prompt_tokens_total"] == 2 * n + 2 * len(chat.prompt_ids)
    assert after["prefix_cache_hit_rate"] > 0


# --- stop strings -------------------------------------------------------------------------------------


def boundary_stop(ref: Reference, expected: Greedy) -> str:
    """A stop string that starts inside one output token and ends inside the next, at its first
    occurrence in the output (the frontend cannot match it on a single token)."""
    out = expected.output_ids
    ends = [len(ref.tok.decode(out[:k], skip_special_tokens=True)) for k in range(len(out) + 1)]
    for k in range(3, len(out) - 1):
        left, right = ends[k] - ends[k - 1], ends[k + 1] - ends[k]
        if left >= 2 and right >= 3:
            stop = expected.text[ends[k] - 2 : ends[k] + 3]
            if expected.text.find(stop) == ends[k] - 2 and stop.strip() == stop:
                return stop
    raise AssertionError(f"no token boundary to test in {expected.text!r}")


@pytest.mark.parametrize("stream", (False, True))
def test_stop_strings_end_the_text_before_them(stream, base_url, client, ref):
    prompt, max_tokens = STOP_PROMPT
    expected = ref.completion(prompt, max_tokens)
    stop = boundary_stop(ref, expected)
    want = expected.text[: expected.text.find(stop)]
    assert want  # some text comes before the stop string
    result = run_request(
        "async-stream" if stream else "sync",
        base_url,
        client,
        False,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        stop=["never-in-the-output", stop],
    )
    assert (result.text, result.finish_reason) == (want, "stop")
    assert result.usage.completion_tokens < len(expected.output_ids)  # vLLM stopped early

    question = CHAT_CASES[0][0]
    chat_expected = ref.chat(question, 16)
    chat_stop = boundary_stop(ref, chat_expected)
    chat = run_request(
        "sync-stream" if stream else "sync",
        base_url,
        client,
        True,
        messages=[{"role": "user", "content": question}],
        max_tokens=16,
        temperature=0,
        stop=chat_stop,
    )
    assert (chat.text, chat.finish_reason) == (chat_expected.text[: chat_expected.text.find(chat_stop)], "stop")


# --- cancellation ---------------------------------------------------------------------------------------


def test_closing_a_stream_aborts_the_vllm_request(base_url, client):
    address = worker_address(base_url)
    cancelled = metric(base_url, "tandem_frontend_cancellations_total") or 0.0
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Tell me a very long story about a dragon."}],
        max_tokens=1500,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = iter(stream)
    for _ in range(3):
        next(chunks)
    busy = asyncio.run(worker_stats(address))
    assert busy["num_running"] == 1 and busy["num_free_blocks"] < busy["num_total_blocks"]
    deadline = time.monotonic() + 6  # the frontend polls the worker's stats every 2 s
    while metric(base_url, "tandem_worker_running_requests") != 1.0:
        assert time.monotonic() < deadline, "the frontend never saw the running request"
        time.sleep(0.1)
    stream.close()

    async def until_idle() -> tuple[float, dict]:
        start = time.monotonic()
        while True:
            stats = await worker_stats(address)
            if (stats["num_running"], stats["num_waiting"]) == (0, 0) or time.monotonic() - start > 5:
                return time.monotonic() - start, stats
            await asyncio.sleep(0.05)

    took, stats = asyncio.run(until_idle())
    assert (stats["num_running"], stats["num_waiting"]) == (0, 0), stats
    assert stats["num_free_blocks"] == stats["num_total_blocks"] and stats["kv_usage"] == 0
    generated = stats["generation_tokens_total"] - busy["generation_tokens_total"]
    assert generated < 1000, generated  # aborted, not run to 1500
    time.sleep(1.0)
    later = asyncio.run(worker_stats(address))
    assert later["generation_tokens_total"] == stats["generation_tokens_total"]  # nothing runs on in vLLM
    print(f"vLLM idle {took:.2f}s after the stream was closed ({generated} tokens generated meanwhile)")

    deadline = time.monotonic() + 6
    while metric(base_url, "tandem_worker_running_requests") != 0.0:
        assert time.monotonic() < deadline, "tandem_worker_running_requests stayed above 0"
        time.sleep(0.1)
    assert (metric(base_url, "tandem_frontend_cancellations_total") or 0.0) >= cancelled + 1


# --- bad input --------------------------------------------------------------------------------------------


def test_a_prompt_over_the_context_length_gets_a_400(base_url, client, ref):
    too_long = [ref.tok.encode(" word")[0]] * MAX_MODEL_LEN
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=too_long, max_tokens=1)
    assert (info.value.status_code, info.value.code, info.value.param) == (400, "context_length_exceeded", "prompt")

    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "word " * 2100}], max_tokens=2
        )
    assert (info.value.status_code, info.value.code) == (400, "context_length_exceeded")

    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=too_long[:2000], max_tokens=100, stream=True)
    assert (info.value.code, info.value.param) == ("context_length_exceeded", "max_tokens")

    # The worker refuses such a prompt itself too (a frontend that did not check).
    async def generate_directly() -> None:
        rpc = RequestPlaneClient()
        try:
            payload = {"request_id": "too-long", "token_ids": too_long, "sampling": {"max_tokens": 1}}
            async for _ in rpc.stream(worker_address(base_url), "generate", payload):
                pass
        finally:
            await rpc.close()

    with pytest.raises(RemoteError) as remote:
        asyncio.run(generate_directly())
    assert remote.value.code == "bad_request" and "context" in remote.value.message

    # The server keeps serving, with vLLM's output unchanged.
    question, max_tokens = CHAT_CASES[1]
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=max_tokens, temperature=0
    )
    assert r.choices[0].message.content == ref.chat(question, max_tokens).text


# --- shutdown (last: it stops the module's server) ---------------------------------------------------------


def test_sigint_stops_the_worker_and_its_vllm_engine_core(serve, base_url):
    tree = psutil.Process(serve.proc.pid).children(recursive=True)
    names = [p.name() for p in tree]
    assert "VLLM::EngineCore" in names, names  # the worker's engine core, a grandchild of serve
    assert serve.stop() == 130  # 128 + SIGINT, as after Ctrl-C
    deadline = time.monotonic() + 10
    while alive := [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]:
        assert time.monotonic() < deadline, f"still running after the server stopped: {alive}"
        time.sleep(0.1)
