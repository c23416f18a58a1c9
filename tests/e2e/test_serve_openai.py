"""`tandem serve` end to end on the real SmolLM2-135M-Instruct, driven by the official openai client.

One server process for the module (frontend + one builtin worker). Greedy outputs are compared
with the builtin engine run in this process on the same token ids: the HTTP layer (chat
template, tokenization, incremental detokenization, stop strings, SSE framing, usage) must not
change a single character.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass

import httpx2 as httpx
import openai
import pytest
from tests.e2e.serve_process import ServeProcess
from tests.support import worker_stats

from tandem.engine.config import EngineConfig
from tandem.engine.llm_engine import LLMEngine
from tandem.protocols.sampling_params import SamplingParams

MODEL = "smollm2-135m-instruct"
MAX_BODY_BYTES = 100_000
VARIANTS = ("sync", "sync-stream", "async", "async-stream")

CHAT_CASES = [  # (question, max_tokens): the first runs into max_tokens, the second ends with EOS
    ("Explain in two sentences why the sky is blue.", 10),
    ("Answer yes or no: is the sky blue?", 16),
]
COMPLETION_CASES = [
    ("The capital of France is", 10),
    ("My favourite colour is", 16),
]


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def serve():
    # float32: greedy texts are compared token for token with a sequential reference engine, across
    # batchings where bfloat16 rounding flips near-ties (tests/e2e/test_engine_bf16_vs_hf.py covers bf16).
    server = ServeProcess(
        "--port", "0", "--dtype", "float32", "--max-body-bytes", str(MAX_BODY_BYTES), "--drain-timeout", "5"
    )
    yield server
    server.stop()


@dataclass
class Greedy:
    prompt_ids: list[int]
    output_ids: list[int]
    text: str
    finish_reason: str


class Reference:
    """The builtin engine in this process: what the server must reproduce exactly."""

    def __init__(self) -> None:
        self.engine = LLMEngine(EngineConfig(model=MODEL, dtype="float32", num_kv_blocks=512))
        self.tok = self.engine.loaded.tokenizer
        self.eos = set(getattr(self.engine.loaded, "eos_token_ids", None) or [self.tok.eos_token_id])
        self._cache: dict[tuple[tuple[int, ...], int], Greedy] = {}

    def chat_ids(self, question: str) -> list[int]:
        text = self.tok.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        return self.tok.encode(text, add_special_tokens=False)

    def completion_ids(self, prompt: str) -> list[int]:
        return self.tok.encode(prompt)

    def greedy(self, prompt_ids: list[int], max_tokens: int) -> Greedy:
        key = (tuple(prompt_ids), max_tokens)
        if key not in self._cache:
            out = self.engine.generate([prompt_ids], SamplingParams(max_tokens=max_tokens, temperature=0))[0]
            finish = "stop" if out and out[-1] in self.eos else "length"
            self._cache[key] = Greedy(prompt_ids, out, self.tok.decode(out, skip_special_tokens=True), finish)
        return self._cache[key]


@pytest.fixture(scope="module")
def ref(serve):  # loads in this process while the server boots
    return Reference()


@pytest.fixture(scope="module")
def base_url(serve, ref):
    return serve.wait_ready(timeout=120)


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
    usage: object | None


def _collect_chat(chunks: list) -> Result:
    choice_chunks = [c for c in chunks if c.choices]
    assert choice_chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in choice_chunks)
    finishes = [c.choices[0].finish_reason for c in choice_chunks if c.choices[0].finish_reason]
    assert len(finishes) == 1 and choice_chunks[-1].choices[0].finish_reason == finishes[0]
    return Result(text, finishes[0], _final_usage(chunks))


def _collect_completion(chunks: list) -> Result:
    choice_chunks = [c for c in chunks if c.choices]
    text = "".join(c.choices[0].text for c in choice_chunks)
    finishes = [c.choices[0].finish_reason for c in choice_chunks if c.choices[0].finish_reason]
    assert len(finishes) == 1 and choice_chunks[-1].choices[0].finish_reason == finishes[0]
    return Result(text, finishes[0], _final_usage(chunks))


def _final_usage(chunks: list) -> object | None:
    """The usage of the trailing ``choices: []`` chunk (None without include_usage); every other
    chunk must have ``usage: null``."""
    assert all(c.usage is None for c in chunks[:-1])
    last = chunks[-1]
    if last.usage is None:
        return None
    assert last.choices == []
    return last.usage


def run_chat(variant: str, base_url: str, client: openai.OpenAI, question: str, **kwargs) -> Result:
    kwargs = {"model": MODEL, "messages": [{"role": "user", "content": question}], **kwargs}
    if variant.endswith("stream"):
        kwargs["stream"] = True
        if variant.startswith("async"):  # the async streams also ask for the usage chunk
            kwargs["stream_options"] = {"include_usage": True}
    if variant == "sync":
        r = client.chat.completions.create(**kwargs)
        return Result(r.choices[0].message.content, r.choices[0].finish_reason, r.usage)
    if variant == "sync-stream":
        return _collect_chat(list(client.chat.completions.create(**kwargs)))

    async def run_async() -> Result:
        async with async_client(base_url) as ac:
            if variant == "async":
                r = await ac.chat.completions.create(**kwargs)
                return Result(r.choices[0].message.content, r.choices[0].finish_reason, r.usage)
            return _collect_chat([c async for c in await ac.chat.completions.create(**kwargs)])

    return asyncio.run(run_async())


def run_completion(variant: str, base_url: str, client: openai.OpenAI, prompt: str | list[int], **kwargs) -> Result:
    kwargs = {"model": MODEL, "prompt": prompt, **kwargs}
    if variant.endswith("stream"):
        kwargs["stream"] = True
        if variant.startswith("async"):
            kwargs["stream_options"] = {"include_usage": True}
    if variant == "sync":
        r = client.completions.create(**kwargs)
        return Result(r.choices[0].text, r.choices[0].finish_reason, r.usage)
    if variant == "sync-stream":
        return _collect_completion(list(client.completions.create(**kwargs)))

    async def run_async() -> Result:
        async with async_client(base_url) as ac:
            if variant == "async":
                r = await ac.completions.create(**kwargs)
                return Result(r.choices[0].text, r.choices[0].finish_reason, r.usage)
            return _collect_completion([c async for c in await ac.completions.create(**kwargs)])

    return asyncio.run(run_async())


def assert_matches(result: Result, expected: Greedy, variant: str) -> None:
    assert result.text == expected.text
    assert result.finish_reason == expected.finish_reason
    if variant == "sync-stream":
        assert result.usage is None  # no stream_options: no usage chunk
        return
    assert result.usage.prompt_tokens == len(expected.prompt_ids)
    assert result.usage.completion_tokens == len(expected.output_ids)
    assert result.usage.total_tokens == len(expected.prompt_ids) + len(expected.output_ids)


def worker_address(base_url: str) -> str:
    workers = httpx.get(base_url + "/health", timeout=10).json()["models"][MODEL]
    assert len(workers) == 1
    return workers[0]["address"]


# --- greedy parity through every client path -------------------------------------------------------


def test_health_lists_the_worker(base_url):
    body = httpx.get(base_url + "/health", timeout=10).json()
    assert body["status"] == "ready"
    [worker] = body["models"][MODEL]
    assert worker["engine"] == "builtin" and worker["role"] == "agg" and worker["context_length"] > 0
    deadline = time.monotonic() + 10  # stats are polled every 2 s
    while worker["stats"] is None and time.monotonic() < deadline:
        time.sleep(0.2)
        [worker] = httpx.get(base_url + "/health", timeout=10).json()["models"][MODEL]
    stats = worker["stats"]
    assert stats is not None and stats["num_total_blocks"] > 0 and stats["num_running"] == 0
    models = httpx.get(base_url + "/v1/models", timeout=10).json()
    assert [m["id"] for m in models["data"]] == [MODEL]


def test_reference_cases_cover_both_finish_reasons(ref):
    chats = {ref.greedy(ref.chat_ids(q), n).finish_reason for q, n in CHAT_CASES}
    completions = {ref.greedy(ref.completion_ids(p), n).finish_reason for p, n in COMPLETION_CASES}
    assert chats == completions == {"stop", "length"}


@pytest.mark.parametrize("variant", VARIANTS)
def test_chat_greedy_matches_engine(variant, base_url, client, ref):
    for question, max_tokens in CHAT_CASES:
        expected = ref.greedy(ref.chat_ids(question), max_tokens)
        result = run_chat(variant, base_url, client, question, max_tokens=max_tokens, temperature=0)
        assert_matches(result, expected, variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_completion_greedy_matches_engine(variant, base_url, client, ref):
    for prompt, max_tokens in COMPLETION_CASES:
        expected = ref.greedy(ref.completion_ids(prompt), max_tokens)
        result = run_completion(variant, base_url, client, prompt, max_tokens=max_tokens, temperature=0)
        assert_matches(result, expected, variant)


@pytest.mark.parametrize("variant", ("sync", "async-stream"))
def test_completion_with_token_id_prompt(variant, base_url, client, ref):
    prompt_ids = ref.completion_ids("Once upon a time")
    expected = ref.greedy(prompt_ids, 10)
    result = run_completion(variant, base_url, client, prompt_ids, max_tokens=10, temperature=0)
    assert_matches(result, expected, variant)


# --- usage chunk and prefix cache ----------------------------------------------------------------

LONG_PROMPT = (
    "The lighthouse keeper wrote in his log every evening: the wind, the colour of the sea, the "
    "ships that passed, the birds that rested on the gallery rail, and the slow turning of the "
    "great lamp above him. On the third night of the storm he wrote"
)


def test_stream_usage_chunk_and_cached_tokens(base_url, client, ref):
    prompt_ids = ref.completion_ids(LONG_PROMPT)
    assert len(prompt_ids) >= 3 * 16
    whole = client.completions.create(model=MODEL, prompt=LONG_PROMPT, max_tokens=8, temperature=0)
    assert whole.usage.prompt_tokens == len(prompt_ids)
    assert whole.usage.prompt_tokens_details.cached_tokens == 0  # a prompt never seen before

    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=LONG_PROMPT,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = _collect_completion(chunks)
    assert chunks[-1].choices == [] and streamed.usage is not None
    assert streamed.text == whole.choices[0].text
    assert streamed.finish_reason == whole.choices[0].finish_reason
    usage = streamed.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (whole.usage.prompt_tokens, whole.usage.completion_tokens)
    cached = usage.prompt_tokens_details.cached_tokens
    assert 2 * 16 <= cached < len(prompt_ids) and cached % 16 == 0  # whole blocks from the first request

    # Chat too: the usage chunk comes last, after the finish_reason chunk, with no choices.
    chat_chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": LONG_PROMPT}],
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chat_chunks[-1].choices == [] and chat_chunks[-1].usage is not None
    assert_matches(_collect_chat(chat_chunks), ref.greedy(ref.chat_ids(LONG_PROMPT), 6), "async-stream")


# --- stop strings across token boundaries ---------------------------------------------------------


def boundary_stop(ref: Reference, expected: Greedy) -> str:
    """A stop string that starts inside one output token and ends inside the next, found at its first
    occurrence in the output (so the server cannot match it on a single token)."""
    out = expected.output_ids
    ends = [len(ref.tok.decode(out[:k], skip_special_tokens=True)) for k in range(len(out) + 1)]
    assert ref.tok.decode(out, skip_special_tokens=True) == expected.text
    for k in range(3, len(out) - 1):
        left, right = ends[k] - ends[k - 1], ends[k + 1] - ends[k]
        if left >= 2 and right >= 3:
            stop = expected.text[ends[k] - 2 : ends[k] + 3]
            if expected.text.find(stop) == ends[k] - 2 and stop.strip() == stop:
                return stop
    raise AssertionError(f"no token boundary to test in {expected.text!r}")


@pytest.mark.parametrize("stream", (False, True))
def test_stop_string_across_token_boundary(stream, base_url, client, ref):
    prompt = "Once upon a time"
    expected = ref.greedy(ref.completion_ids(prompt), 24)
    stop = boundary_stop(ref, expected)
    want = expected.text[: expected.text.find(stop)]
    assert want  # some text comes before the stop string
    variant = "async-stream" if stream else "sync"
    result = run_completion(
        variant, base_url, client, prompt, max_tokens=24, temperature=0, stop=["never-in-the-output", stop]
    )
    assert (result.text, result.finish_reason) == (want, "stop")
    assert result.usage.completion_tokens < len(expected.output_ids)  # the worker stopped early

    # Chat, same rule: the chat answer's own boundary.
    question = CHAT_CASES[0][0]
    chat_expected = ref.greedy(ref.chat_ids(question), 16)
    chat_stop = boundary_stop(ref, chat_expected)
    chat = run_chat(
        "sync-stream" if stream else "sync", base_url, client, question, max_tokens=16, temperature=0, stop=chat_stop
    )
    assert (chat.text, chat.finish_reason) == (chat_expected.text[: chat_expected.text.find(chat_stop)], "stop")


# --- concurrency ----------------------------------------------------------------------------------

CONCURRENT_PROMPTS = [
    f"{subject} is"
    for subject in (
        "The tallest mountain in the world",
        "My favourite book",
        "The best way to learn to cook",
        "The largest ocean on Earth",
        "A good name for a cat",
        "The main ingredient of bread",
        "The first thing I do in the morning",
        "The speed of light",
        "The reason leaves turn red",
        "The oldest city in Europe",
        "The capital of Japan",
        "A healthy breakfast",
        "The most popular sport in Brazil",
        "The sound a cow makes",
        "The colour of a ripe banana",
        "The number of legs on a spider",
    )
]


def test_sixteen_concurrent_streams_match_sequential_greedy(base_url, ref):
    max_tokens = 16
    expected = [ref.greedy(ref.completion_ids(p), max_tokens) for p in CONCURRENT_PROMPTS]
    assert len({e.text for e in expected}) == len(expected)  # distinct outputs: no mix-up goes unseen

    async def one(ac: openai.AsyncOpenAI, prompt: str) -> Result:
        stream = await ac.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        return _collect_completion([c async for c in stream])

    async def run_all() -> list[Result]:
        async with async_client(base_url) as ac:
            return await asyncio.gather(*(one(ac, p) for p in CONCURRENT_PROMPTS))

    results = asyncio.run(run_all())
    for result, want in zip(results, expected, strict=True):
        assert_matches(result, want, "async-stream")


# --- client disconnect ----------------------------------------------------------------------------


def cancellations(base_url: str) -> float:
    text = httpx.get(base_url + "/metrics", timeout=10).text
    match = re.search(r'^tandem_frontend_cancellations_total\{model="' + re.escape(MODEL) + r'"\} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


def test_client_disconnect_mid_stream_frees_the_kv_cache(base_url, client):
    address = worker_address(base_url)
    before = cancellations(base_url)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Tell me a very long story about a dragon."}],
        max_tokens=400,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = iter(stream)
    for _ in range(3):
        next(chunks)
    busy = asyncio.run(worker_stats(address))
    assert busy["num_running"] == 1 and busy["num_free_blocks"] < busy["num_total_blocks"]
    stream.close()

    async def until_idle() -> dict:
        deadline = time.monotonic() + 10
        while True:
            stats = await worker_stats(address)
            idle = stats["num_running"] == 0 and stats["num_waiting"] == 0
            if (idle and stats["num_free_blocks"] == stats["num_total_blocks"]) or time.monotonic() > deadline:
                return stats
            await asyncio.sleep(0.1)

    stats = asyncio.run(until_idle())
    assert (stats["num_running"], stats["num_waiting"]) == (0, 0)
    assert stats["num_free_blocks"] == stats["num_total_blocks"] and stats["kv_usage"] == 0
    assert stats["generation_tokens_total"] - busy["generation_tokens_total"] < 200  # stopped, not run to 400
    deadline = time.monotonic() + 5
    while cancellations(base_url) < before + 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cancellations(base_url) >= before + 1


# --- bad input ------------------------------------------------------------------------------------


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(base_url, client):
    messages = [{"role": "user", "content": "Hi!"}]
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=messages, max_tokens=4)
    assert info.value.status_code == 404 and "no-such-model" in info.value.message

    context = httpx.get(base_url + "/health", timeout=10).json()["models"][MODEL][0]["context_length"]
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="Hello there", max_tokens=context)
    assert info.value.code == "context_length_exceeded" and info.value.param == "max_tokens"

    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, n=2)
    assert info.value.status_code == 400 and info.value.param == "n"

    url = base_url + "/v1/chat/completions"
    r = httpx.post(
        url,
        content=b'{"model": "' + MODEL.encode() + b'", "messages": [',
        timeout=10,
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]

    big = json.dumps({"model": MODEL, "prompt": "x" * 200_000, "max_tokens": 1}).encode()
    r = httpx.post(base_url + "/v1/completions", content=big, timeout=10, headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert r.json()["error"]["message"]

    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
    assert r.choices[0].message.content and r.usage.completion_tokens >= 1


# --- shutdown (last: it stops the module's server) ----------------------------------------------------


def test_sigint_stops_the_server_cleanly(serve, base_url):
    workers = serve.worker_processes()
    assert len(workers) == 1
    assert serve.stop() == 130  # 128 + SIGINT, as after Ctrl-C
    assert "stopping" in serve.output
    assert not any(w.is_running() and w.status() != "zombie" for w in workers)
