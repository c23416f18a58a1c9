"""Fuzz the frontend over real HTTP: schemathesis over its OpenAPI schema, and random JSON bodies.

The deployment is in-process (memory discovery, a mocker worker with no modeled sleeps, the
real FrontendServer). Whatever the body, the frontend must never answer 5xx, every 4xx must
carry OpenAI's error body, and every 200 stream must end with ``[DONE]`` and no error event.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from tests.frontend_harness import Deployment, assert_openai_error

from tandem.frontend.config import FrontendConfig

MODEL = "mock"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
FUZZ_SETTINGS = settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def deployment():
    dep = Deployment()
    try:
        # A short context keeps every valid request short (the mocker never samples EOS).
        dep.add_worker(MODEL, max_model_len=128)
        config = FrontendConfig(port=0, worker_stats_interval_s=0.5, max_body_bytes=64 * 1024, default_max_tokens=8)
        dep.url = dep.add_frontend(config).url
        dep.session = requests.Session()
        reply = dep.session.post(
            dep.url + COMPLETIONS, json={"model": MODEL, "prompt": "warm up", "max_tokens": 1}, timeout=60
        )
        assert reply.status_code == 200, reply.text
        yield dep
    finally:
        dep.close()


def check_response(status: int, content_type: str, text: str, whole: bool = True) -> None:
    """No 5xx; errors in OpenAI's shape; streams complete without an error event.

    ``whole``: the client read the entire body (schemathesis may stop reading a long stream)."""
    assert status < 500, (status, text[:2000])
    if status >= 400:
        assert content_type.startswith("application/json"), (status, content_type)
        assert_openai_error(status, json.loads(text))
    elif content_type.startswith("text/event-stream"):
        assert not whole or text.endswith("data: [DONE]\n\n"), text[-500:]
        assert 'data: {"error"' not in text, text[-2000:]


# --- schemathesis over the served OpenAPI schema -------------------------------------------------


def test_openapi_schema_refs_resolve(deployment):
    schema = deployment.session.get(deployment.url + "/openapi.json", timeout=10).json()
    refs = set(re.findall(r'"\$ref": "([^"]+)"', json.dumps(schema)))
    assert refs, "the request bodies should reference their nested models"
    for ref in refs:
        node: Any = schema
        assert ref.startswith("#/"), ref
        for part in ref[2:].split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]
    bodies = {
        path: schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        for path in (CHAT, COMPLETIONS)
    }
    assert bodies[CHAT]["required"] == ["model", "messages"]
    assert bodies[COMPLETIONS]["required"] == ["model", "prompt"]


def _pin_model(case: Any, pin: bool) -> Any:
    """Half the generated bodies name the served model, so they get past the model lookup."""
    if pin and isinstance(case.body, dict):
        case.body["model"] = MODEL
    return case


def test_schemathesis_finds_no_server_errors(deployment):
    schema = schemathesis.openapi.from_url(deployment.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {op.label for op in operations}
    assert {"POST /v1/chat/completions", "POST /v1/completions", "GET /v1/models", "GET /health"} <= labels
    seen: dict[str, set[int]] = {}

    for operation in operations:
        cases = operation.as_strategy(GenerationMode.POSITIVE) | operation.as_strategy(GenerationMode.NEGATIVE)

        @FUZZ_SETTINGS
        @given(case=cases, pin=st.booleans())
        def fuzz(case: Any, pin: bool) -> None:
            response = _pin_model(case, pin).call(base_url=deployment.url, session=deployment.session, timeout=30)
            seen.setdefault(operation.label, set()).add(response.status_code)
            whole = not response.stream_cut_short and response.content_size == len(response.content)
            check_response(
                response.status_code,
                response.headers.get("content-type", [""])[0],
                response.content.decode("utf-8", "replace"),
                whole,
            )

        fuzz()

    # Every operation ran; the generation routes refused some bodies (the fuzzer is not too tame).
    assert set(seen) == labels, seen
    assert any(400 <= s < 500 for s in seen["POST /v1/chat/completions"] | seen["POST /v1/completions"]), seen


# --- random JSON at the generation routes ----------------------------------------------------------

# Text with a lone surrogate: json.dumps escapes it ("\\ud800"), which is valid JSON but not text.
SURROGATE_TEXT = st.builds(
    "{}{}{}".format, st.text(max_size=3), st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), st.text(max_size=3)
)
TEXT = st.text(max_size=20) | SURROGATE_TEXT
SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT
JSON_VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4), max_leaves=12
)

FIELDS = [
    "model",
    "messages",
    "prompt",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "stop_token_ids",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "n",
    "ignore_eos",
    "min_tokens",
    "user",
    "cache_salt",
    "stream",
    "stream_options",
    "logit_bias",
    "best_of",
    "logprobs",
    "top_logprobs",
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "response_format",
    "audio",
    "modalities",
    "prediction",
    "echo",
    "suffix",
]

# Values that are plausible for some field, so mutations often stay close to valid.
NEAR_VALID = (
    st.sampled_from(
        [
            MODEL,
            "",
            "other-model",
            0,
            1,
            2,
            -1,
            0.5,
            2.5,
            True,
            False,
            None,
            [],
            {},
            "stop",
            ["a", "b"],
            [1, 2, 3],
            {"include_usage": True},
            {"type": "text"},
            {"type": "json_object"},
            "none",
            ["text"],
            2**31,
            2**64,
            1e308,
            -1e308,
        ]
    )
    | SURROGATE_TEXT
    | JSON_VALUES
)

CHAT_BODY = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
COMPLETION_BODY = {"model": MODEL, "prompt": "Hello", "max_tokens": 4}


def post(deployment: Deployment, path: str, data: bytes) -> None:
    reply = deployment.session.post(
        deployment.url + path, data=data, timeout=30, headers={"Content-Type": "application/json"}
    )
    check_response(reply.status_code, reply.headers.get("content-type", ""), reply.text)


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(body=JSON_VALUES, path=st.sampled_from([CHAT, COMPLETIONS]))
def test_random_json_bodies(deployment, body, path):
    post(deployment, path, json.dumps(body).encode())


@settings(max_examples=400, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from([CHAT, COMPLETIONS]), data=st.data())
def test_mutated_valid_bodies(deployment, path, data):
    body = json.loads(json.dumps(CHAT_BODY if path == CHAT else COMPLETION_BODY))
    for _ in range(data.draw(st.integers(1, 4), label="mutations")):
        field = data.draw(st.sampled_from(FIELDS) | TEXT, label="field")
        if field in body and data.draw(st.booleans(), label="delete"):
            del body[field]
        else:
            body[field] = data.draw(NEAR_VALID, label=f"value of {field}")
    if data.draw(st.booleans(), label="mutate a message") and isinstance(body.get("messages"), list):
        body["messages"].append(
            {
                "role": data.draw(st.sampled_from(["user", "assistant", "system", "developer", "tool", "bot", 3])),
                "content": data.draw(
                    NEAR_VALID
                    | st.lists(
                        st.fixed_dictionaries(
                            {"type": st.sampled_from(["text", "image_url", "x"]), "text": NEAR_VALID}
                        ),
                        max_size=2,
                    )
                ),
            }
        )
    post(deployment, path, json.dumps(body).encode())


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from([CHAT, COMPLETIONS]), data=st.data())
def test_broken_bytes(deployment, path, data):
    valid = json.dumps(CHAT_BODY if path == CHAT else COMPLETION_BODY).encode()
    kind = data.draw(st.sampled_from(["truncate", "random", "splice"]), label="kind")
    if kind == "truncate":
        body = valid[: data.draw(st.integers(0, len(valid) - 1), label="cut")]
    elif kind == "random":
        body = data.draw(st.binary(max_size=200), label="bytes")
    else:
        at = data.draw(st.integers(0, len(valid)), label="at")
        body = valid[:at] + data.draw(st.binary(min_size=1, max_size=8), label="junk") + valid[at:]
    post(deployment, path, body)


def test_deeply_nested_json_is_a_400_not_a_crash(deployment):
    for depth in (100, 5000, 60000):
        for path in (CHAT, COMPLETIONS):
            nested = b'{"model": "mock", "messages": ' + b"[" * depth + b"]" * depth + b"}"
            post(deployment, path, nested)
            deep_object = b'{"model": "mock", "prompt": ' + b'{"a":' * depth + b"1" + b"}" * depth + b"}"
            post(deployment, path, deep_object)


def test_metrics_labels_stay_bounded_after_fuzzing(deployment):
    # Runs last: thousands of random model names above must not have become label values.
    text = deployment.session.get(deployment.url + "/metrics", timeout=10).text
    labels = set(re.findall(r'^tandem_frontend_\w+\{[^}]*model="([^"]*)"', text, flags=re.MULTILINE))
    assert labels <= {MODEL, "unknown"}, sorted(labels)[:20]
    assert MODEL in labels and "unknown" in labels
