"""The OpenAI frontend over real HTTP, in front of in-process mocker workers (memory discovery).

Every bad request gets its status and OpenAI's error body; a drained model answers 503; a
registered but unreachable worker is skipped (the request is retried) and marked down.
"""

from __future__ import annotations

import json
import socket

import openai
import pytest
import requests
from tests.frontend_harness import Deployment, assert_openai_error, raw_request
from tests.support import poll_until

from tandem.frontend.config import FrontendConfig
from tandem.runtime.discovery import make_discovery

MODEL = "mock"
CONTEXT = 512
LIMIT = 64 * 1024
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MESSAGES = [{"role": "user", "content": "Say hello"}]


@pytest.fixture(scope="module")
def deployment():
    dep = Deployment()
    try:
        dep.add_worker(MODEL, max_model_len=CONTEXT)
        dep.add_worker(MODEL, max_model_len=CONTEXT)
        dep.drain_target = dep.add_worker("mock-drain")
        dep.add_worker("mock-retry")
        dep.dead_card = dep.register_dead_worker("mock-retry", "dead-worker")
        config = FrontendConfig(port=0, worker_stats_interval_s=0.2, max_body_bytes=LIMIT, default_max_tokens=16)
        dep.server = dep.add_frontend(config)
        dep.url = dep.server.url
        # Load the tokenizer once (the first request of a model pays for it).
        reply = requests.post(dep.url + CHAT, json={"model": MODEL, "messages": MESSAGES, "max_tokens": 2}, timeout=60)
        assert reply.status_code == 200, reply.text
        yield dep
    finally:
        dep.close()


@pytest.fixture(scope="module")
def client(deployment):
    return openai.OpenAI(base_url=deployment.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def post(deployment, path, body, **kwargs):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return requests.post(
        deployment.url + path, data=data, headers={"Content-Type": "application/json"}, timeout=30, **kwargs
    )


# --- requests that succeed ------------------------------------------------------------------


def test_chat_and_completions_through_the_openai_client(client):
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5)
    assert chat.choices[0].finish_reason == "length" and chat.usage.completion_tokens == 5
    assert chat.choices[0].message.role == "assistant"

    text = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=4)
    assert text.choices[0].finish_reason == "length" and text.usage.completion_tokens == 4

    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=6, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6


def test_stop_strings_end_the_text_the_same_way_streamed_or_not(client):
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=60, seed=7, temperature=1.0, stop=["e"])
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert whole.choices[0].finish_reason == "stop" and chunks[-1].choices[0].finish_reason == "stop"
    assert streamed == whole.choices[0].message.content and "e" not in streamed
    unstopped = client.chat.completions.create(**{**kwargs, "stop": None})
    assert unstopped.choices[0].message.content.startswith(streamed + "e")


def test_default_max_tokens_caps_an_open_ended_request(deployment):
    reply = post(deployment, COMPLETIONS, {"model": MODEL, "prompt": [10, 11, 12]})
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] == 16


def test_models_lists_the_model(deployment, client):
    ids = [m.id for m in client.models.list()]
    assert MODEL in ids and "mock-retry" in ids
    body = requests.get(deployment.url + "/v1/models/" + MODEL, timeout=10).json()
    assert body["id"] == MODEL and body["max_model_len"] == CONTEXT
    reply = requests.get(deployment.url + "/v1/models/no-such-model", timeout=10)
    assert assert_openai_error(reply.status_code, reply.json(), 404)["code"] == "model_not_found"


# --- bad requests -----------------------------------------------------------------------------

LONG_PROMPT = "hello " * (CONTEXT + 50)

BAD_REQUESTS = [
    # (id, path, body, status, param, code)
    ("malformed-json", CHAT, b'{"model": "mock", "messages": [', 400, None, "invalid_json"),
    ("not-utf8", CHAT, b'{"model": "\xff\xfe"}', 400, None, "invalid_json"),
    ("empty-body", CHAT, b"", 400, None, "invalid_json"),
    ("json-array", CHAT, b'[{"model": "mock"}]', 400, None, "invalid_json"),
    ("json-string", COMPLETIONS, b'"hello"', 400, None, "invalid_json"),
    ("json-null", COMPLETIONS, b"null", 400, None, "invalid_json"),
    # A lone UTF-16 surrogate is valid JSON but not text (it used to reach the tokenizer: 500).
    (
        "surrogate-in-content",
        CHAT,
        b'{"model": "mock", "messages": [{"role": "user", "content": "hi \\ud800"}]}',
        400,
        None,
        "invalid_json",
    ),
    ("surrogate-in-model", CHAT, b'{"model": "\\udfff", "messages": []}', 400, None, "invalid_json"),
    ("surrogate-in-prompt", COMPLETIONS, b'{"model": "mock", "prompt": "\\ud83d"}', 400, None, "invalid_json"),
    (
        "surrogate-in-cache-salt",
        COMPLETIONS,
        b'{"model": "mock", "prompt": "hi", "cache_salt": "\\udc80"}',
        400,
        None,
        "invalid_json",
    ),
    ("surrogate-as-cesu-bytes", COMPLETIONS, b'{"model": "mock", "prompt": "\xed\xa0\x80"}', 400, None, "invalid_json"),
    ("missing-model", CHAT, {"messages": MESSAGES}, 400, "model", None),
    ("missing-messages", CHAT, {"model": MODEL}, 400, "messages", None),
    ("missing-prompt", COMPLETIONS, {"model": MODEL}, 400, "prompt", None),
    ("unknown-model", CHAT, {"model": "no-such-model", "messages": MESSAGES}, 404, "model", "model_not_found"),
    (
        "unknown-model-stream",
        COMPLETIONS,
        {"model": "no-such-model", "prompt": "hi", "stream": True},
        404,
        "model",
        "model_not_found",
    ),
    ("n-2", CHAT, {"model": MODEL, "messages": MESSAGES, "n": 2}, 400, "n", "unsupported_parameter"),
    (
        "temperature-string",
        CHAT,
        {"model": MODEL, "messages": MESSAGES, "temperature": "0.5"},
        400,
        "temperature",
        None,
    ),
    (
        "temperature-too-high",
        COMPLETIONS,
        {"model": MODEL, "prompt": "hi", "temperature": 2.5},
        400,
        "temperature",
        None,
    ),
    ("max-tokens-0", CHAT, {"model": MODEL, "messages": MESSAGES, "max_tokens": 0}, 400, "max_tokens", None),
    ("max-tokens-bool", COMPLETIONS, {"model": MODEL, "prompt": "hi", "max_tokens": True}, 400, "max_tokens", None),
    (
        "prompt-plus-max-tokens-over-context",
        CHAT,
        {"model": MODEL, "messages": MESSAGES, "max_tokens": CONTEXT},
        400,
        "max_tokens",
        "context_length_exceeded",
    ),
    (
        "prompt-over-context",
        COMPLETIONS,
        {"model": MODEL, "prompt": LONG_PROMPT},
        400,
        "prompt",
        "context_length_exceeded",
    ),
    (
        "tools",
        CHAT,
        {
            "model": MODEL,
            "messages": MESSAGES,
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        },
        400,
        "tools",
        "unsupported_parameter",
    ),
    (
        "image-part",
        CHAT,
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}],
        },
        400,
        "messages.0.content",
        None,
    ),
    (
        "null-user-content",
        CHAT,
        {"model": MODEL, "messages": [{"role": "user", "content": None}]},
        400,
        "messages.0.content",
        None,
    ),
    (
        "null-content-after-a-turn",
        CHAT,
        {
            "model": MODEL,
            "messages": [*MESSAGES, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": None}],
        },
        400,
        "messages.2.content",
        None,
    ),
    (
        "stream-options-without-stream",
        CHAT,
        {"model": MODEL, "messages": MESSAGES, "stream_options": {"include_usage": True}},
        400,
        "stream_options",
        None,
    ),
    (
        "too-many-stops",
        COMPLETIONS,
        {"model": MODEL, "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]},
        400,
        "stop",
        None,
    ),
    ("token-over-vocab", COMPLETIONS, {"model": MODEL, "prompt": [10, 2**31 - 1]}, 400, "prompt", None),
    (
        "min-tokens-over-max",
        COMPLETIONS,
        {"model": MODEL, "prompt": "hi", "max_tokens": 2, "min_tokens": 3},
        400,
        "min_tokens",
        None,
    ),
]


@pytest.mark.parametrize(
    ("path", "body", "status", "param", "code"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
def test_bad_requests_get_openai_errors(deployment, path, body, status, param, code):
    reply = post(deployment, path, body)
    assert reply.headers["content-type"].startswith("application/json")
    error = assert_openai_error(reply.status_code, reply.json(), status)
    assert error["param"] == param and error["code"] == code, error


def test_escaped_surrogate_pairs_are_fine(deployment):
    body = b'{"model": "mock", "messages": [{"role": "user", "content": "\\ud83e\\udd80"}], "max_tokens": 1}'
    reply = post(deployment, CHAT, body)
    assert reply.status_code == 200, reply.text


def test_openai_client_raises_the_matching_exceptions(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert err.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, n=2)
    assert err.value.param == "n"


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_oversized_body_gets_413(deployment, chunked):
    filler = "x" * (LIMIT + 1024)
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": filler}]}).encode()
    parts = [body[i : i + 8192] for i in range(0, len(body), 8192)]
    headers = {"Content-Type": "application/json"}
    if not chunked:
        headers["Content-Length"] = str(len(body))
    status, content = raw_request(deployment.url, "POST", CHAT, headers, parts, chunked=chunked)
    error = assert_openai_error(status, json.loads(content), 413)
    assert error["code"] == "request_too_large"


def test_body_just_under_the_limit_is_read(deployment):
    filler = "y" * (LIMIT - 200)
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": filler}]}).encode()
    assert len(body) <= LIMIT
    status, content = raw_request(
        deployment.url, "POST", CHAT, {"Content-Type": "application/json"}, [body[:30000], body[30000:]], chunked=True
    )
    # Parsed, then refused for its length (far over a 512-token context), not for its size.
    assert assert_openai_error(status, json.loads(content), 400)["code"] == "context_length_exceeded"


def test_unknown_route_and_wrong_method_get_json_errors(deployment):
    reply = requests.get(deployment.url + "/v1/nothing-here", timeout=10)
    assert_openai_error(reply.status_code, reply.json(), 404)
    reply = requests.post(deployment.url + "/v2/chat/completions", json={}, timeout=10)
    assert_openai_error(reply.status_code, reply.json(), 404)
    reply = requests.get(deployment.url + CHAT, timeout=10)
    assert_openai_error(reply.status_code, reply.json(), 405)
    reply = requests.put(deployment.url + COMPLETIONS, json={}, timeout=10)
    assert_openai_error(reply.status_code, reply.json(), 405)
    reply = requests.post(deployment.url + "/v1/models", json={}, timeout=10)
    assert_openai_error(reply.status_code, reply.json(), 405)


def test_keep_alive_connections_have_nagle_off(deployment):
    # With Nagle on, every keep-alive response waited ~40 ms for the client's delayed ACK.
    session = requests.Session()
    assert session.get(deployment.url + "/live", timeout=10).status_code == 200

    async def nodelay_flags() -> list[int]:
        connections = deployment.server._server.server_state.connections
        return [
            conn.transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            for conn in connections
        ]

    flags = deployment.run(nodelay_flags())
    session.close()
    assert flags and all(flags), flags


# --- health, liveness, metrics -----------------------------------------------------------------


def test_health_and_live(deployment):
    reply = requests.get(deployment.url + "/health", timeout=10)
    assert reply.status_code == 200
    body = reply.json()
    assert body["status"] == "ready" and len(body["models"][MODEL]) == 2
    assert requests.get(deployment.url + "/live", timeout=10).json() == {"status": "alive"}


def test_health_is_503_without_workers(deployment):
    empty = make_discovery(f"{deployment.discovery_spec}-empty")
    server = deployment.add_frontend(
        FrontendConfig(port=0, worker_stats_interval_s=0), discovery=empty, models=["later"]
    )
    reply = requests.get(server.url + "/health", timeout=10)
    assert reply.status_code == 503 and reply.json()["status"] == "no_workers"
    assert requests.get(server.url + "/live", timeout=10).status_code == 200
    # A model named up front but with no worker yet is 503, not 404.
    reply = requests.post(server.url + CHAT, json={"model": "later", "messages": MESSAGES}, timeout=10)
    assert assert_openai_error(reply.status_code, reply.json(), 503)["code"] == "no_worker_available"
    assert requests.get(server.url + "/v1/models", timeout=10).json()["data"] == []


def test_metrics_after_requests(deployment, client):
    client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3)
    post(deployment, CHAT, {"model": "no-such-model", "messages": MESSAGES})

    def scrape() -> str:
        return requests.get(deployment.url + "/metrics", timeout=10).text

    poll_until(lambda: 'tandem_worker_kv_usage{model="mock"' in scrape(), timeout=10)
    text = scrape()
    assert 'tandem_frontend_requests_total{endpoint="chat",model="mock",status="200"}' in text
    # Model names no worker serves are not label values (any client could mint new series).
    assert 'tandem_frontend_requests_total{endpoint="chat",model="unknown",status="404"}' in text
    assert "no-such-model" not in text
    assert 'tandem_frontend_time_to_first_token_seconds_count{model="mock"}' in text
    assert "tandem_frontend_inter_token_latency_seconds_bucket" in text
    assert 'tandem_frontend_workers{model="mock"} 2.0' in text


# --- workers going away -----------------------------------------------------------------------


def test_model_whose_only_worker_drained_gets_503(deployment):
    body = {"model": "mock-drain", "prompt": "hi", "max_tokens": 2}
    assert post(deployment, COMPLETIONS, body).status_code == 200
    deployment.drain(deployment.drain_target)
    frontend = deployment.server.frontend
    poll_until(lambda: not frontend.live_workers("mock-drain"))
    for path, request in ((COMPLETIONS, body), (CHAT, {"model": "mock-drain", "messages": MESSAGES, "stream": True})):
        reply = post(deployment, path, request)
        error = assert_openai_error(reply.status_code, reply.json(), 503)
        assert error["code"] == "no_worker_available" and error["type"] == "service_unavailable_error"
    ids = [m["id"] for m in requests.get(deployment.url + "/v1/models", timeout=10).json()["data"]]
    assert "mock-drain" not in ids


def test_unreachable_worker_is_skipped_and_marked_down(deployment):
    frontend = deployment.server.frontend
    dead = deployment.dead_card.worker_id
    assert dead in {c.worker_id for c in frontend.live_workers("mock-retry")}
    # Round-robin over two workers: at least one of these requests picks the dead one first.
    for i in range(4):
        stream = i % 2 == 1
        reply = post(deployment, CHAT, {"model": "mock-retry", "messages": MESSAGES, "max_tokens": 3, "stream": stream})
        assert reply.status_code == 200, reply.text
        if stream:
            assert reply.text.rstrip().endswith("data: [DONE]") and '"error"' not in reply.text
        else:
            assert reply.json()["usage"]["completion_tokens"] == 3
    assert dead not in {c.worker_id for c in frontend.live_workers("mock-retry")}
    assert dead in frontend.pool._down_until
    health = requests.get(deployment.url + "/health", timeout=10).json()
    assert [w["worker_id"] for w in health["models"]["mock-retry"]] != [] and dead not in [
        w["worker_id"] for w in health["models"]["mock-retry"]
    ]


def test_model_with_only_an_unreachable_worker_gets_503(deployment):
    deployment.register_dead_worker("mock-dead-only", "dead-only-worker")
    frontend = deployment.server.frontend
    poll_until(lambda: bool(frontend.live_workers("mock-dead-only")))
    reply = post(deployment, COMPLETIONS, {"model": "mock-dead-only", "prompt": "hi", "max_tokens": 2})
    assert assert_openai_error(reply.status_code, reply.json(), 503)["code"] == "no_worker_available"
    assert not frontend.live_workers("mock-dead-only")  # marked down
    # Now known but down: refused before any stream starts.
    reply = post(deployment, CHAT, {"model": "mock-dead-only", "messages": MESSAGES, "stream": True})
    assert assert_openai_error(reply.status_code, reply.json(), 503)["code"] == "no_worker_available"


def test_worker_lost_while_the_prompt_was_prepared_gets_503(deployment):
    # The only worker goes away between validation and routing (e.g. while a long prompt is
    # tokenized on the thread pool): 503, not a 500 from the pool's NoWorkerError.
    service = deployment.add_worker("mock-race")
    frontend = deployment.server.frontend
    poll_until(lambda: bool(frontend.live_workers("mock-race")))
    prepare = frontend.prepare

    async def prepare_then_lose_the_worker(request, arrival):
        spec = await prepare(request, arrival)
        frontend.pool.mark_down(service.worker_id)
        return spec

    frontend.prepare = prepare_then_lose_the_worker
    try:
        for stream in (False, True):
            reply = post(deployment, COMPLETIONS, {"model": "mock-race", "prompt": "hi", "stream": stream})
            assert assert_openai_error(reply.status_code, reply.json(), 503)["code"] == "no_worker_available"
            frontend.pool._down_until.pop(service.worker_id)
    finally:
        frontend.prepare = prepare
