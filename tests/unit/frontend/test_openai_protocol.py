"""Unit tests for the OpenAI protocol layer (tandem.frontend.{protocol,errors,sampling})."""

from __future__ import annotations

import json
from typing import Any

import openai.types as oai
import openai.types.chat as oai_chat
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from tandem.frontend.errors import (
    OpenAIError,
    bad_request,
    context_too_long,
    error_body,
    from_validation_error,
    no_worker,
    not_found_model,
    payload_too_large,
)
from tandem.frontend.openai_requests import ChatCompletionRequest, CompletionRequest, parse_request
from tandem.frontend.openai_responses import (
    ChatChoiceLogprobs,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionResponse,
    ChatResponseMessage,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionResponse,
    DeltaMessage,
    ModelCard,
    ModelList,
    Usage,
)
from tandem.frontend.sampling import stop_strings, to_sampling_params
from tandem.protocols.sampling_params import SamplingParams

MSG = [{"role": "user", "content": "hi"}]


def chat(**kw: Any) -> ChatCompletionRequest:
    return parse_request(ChatCompletionRequest, {"model": "m", "messages": MSG, **kw})


def comp(**kw: Any) -> CompletionRequest:
    return parse_request(CompletionRequest, {"model": "m", "prompt": "hello", **kw})


def err_of(fn: Any, *a: Any, **kw: Any) -> OpenAIError:
    with pytest.raises(OpenAIError) as ei:
        fn(*a, **kw)
    return ei.value


# ------------------------------------------------------------------------------- errors


def test_error_helpers_status_and_body() -> None:
    cases = [
        (bad_request("x", "temperature"), 400, "temperature"),
        (not_found_model("nope"), 404, "model"),
        (context_too_long(100, 90, 20), 400, "messages"),
        (payload_too_large(1024), 413, None),
        (no_worker("m"), 503, "model"),
    ]
    for e, status, param in cases:
        assert e.status == status
        body = e.error_body()
        assert set(body) == {"error"}
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert body["error"]["param"] == param
        assert body["error"]["message"]
        json.dumps(body)
    assert not_found_model("nope").code == "model_not_found"
    assert context_too_long(100, 90, 20).code == "context_length_exceeded"
    assert error_body("m", param="p")["error"] == {
        "message": "m",
        "type": "invalid_request_error",
        "param": "p",
        "code": None,
    }


def test_from_validation_error_names_first_field() -> None:
    class M(BaseModel):
        a: int

    with pytest.raises(ValidationError) as ei:
        M.model_validate({"a": "x"})
    e = from_validation_error(ei.value)
    assert (e.status, e.param) == (400, "a")


# ------------------------------------------------------------------------------- parsing


def test_minimal_requests_parse() -> None:
    r = chat()
    assert r.messages[0].content == "hi" and r.stream is False and r.stop == []
    c = comp()
    assert c.prompt == "hello"


def test_maximal_chat_request_parses() -> None:
    body = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "s"},
            {"role": "developer", "content": [{"type": "text", "text": "d"}]},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "name": "bob"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "go"},
        ],
        "max_tokens": 10,
        "max_completion_tokens": 5,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 40,
        "min_p": 0.05,
        "seed": 1234,
        "stop": ["\n\n", "END"],
        "stop_token_ids": [2, 3],
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "repetition_penalty": 1.1,
        "logprobs": True,
        "top_logprobs": 5,
        "n": 1,
        "ignore_eos": True,
        "min_tokens": 2,
        "user": "u1",
        "cache_salt": "salt",
        "stream": True,
        "stream_options": {"include_usage": True},
        "tool_choice": "none",
        "response_format": {"type": "text"},
        "parallel_tool_calls": False,
        "some_future_field": {"x": 1},
        "store": False,
        "metadata": {"a": "b"},
    }
    r = parse_request(ChatCompletionRequest, json.dumps(body).encode())
    assert [m.content for m in r.messages] == ["s", "d", "a\nb", "ok", "go"]
    assert r.messages[1].as_template_message() == {"role": "system", "content": "d"}
    assert r.include_usage
    sp = to_sampling_params(r, context_length=100, prompt_len=20)
    assert sp == SamplingParams(
        max_tokens=5,
        min_tokens=2,
        temperature=0.7,
        top_p=0.9,
        top_k=40,
        min_p=0.05,
        seed=1234,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        repetition_penalty=1.1,
        stop_token_ids=[2, 3],
        ignore_eos=True,
        logprobs=5,
    )
    assert stop_strings(r) == ["\n\n", "END"]


def test_maximal_completion_request_parses() -> None:
    c = comp(
        prompt=[1, 2, 3],
        logprobs=3,
        max_tokens=4,
        stop="x",
        seed=0,
        echo=False,
        best_of=1,
        suffix=None,
        stream=True,
        stream_options={"include_usage": False},
    )
    assert c.prompt == [1, 2, 3] and c.stop == ["x"] and not c.include_usage
    sp = to_sampling_params(c, context_length=10, prompt_len=3)
    assert sp.logprobs == 3 and sp.max_tokens == 4


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [("abc", "abc"), (["abc"], "abc"), ([5, 6], [5, 6]), ([[5, 6]], [5, 6]), ([0], [0])],
)
def test_prompt_forms(prompt: Any, expected: Any) -> None:
    assert comp(prompt=prompt).prompt == expected


@pytest.mark.parametrize(
    "prompt",
    [["a", "b"], [[1], [2]], [], "", [[]], [1, "a"], [-1], [True], [1.5], {"a": 1}, 3, None],
)
def test_bad_prompts(prompt: Any) -> None:
    e = err_of(comp, prompt=prompt)
    assert (e.status, e.param) == (400, "prompt")


def test_batched_prompt_message_is_clear() -> None:
    assert "batched prompts are not supported" in err_of(comp, prompt=["a", "b"]).message


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", 2.5),
        ("temperature", -0.1),
        ("temperature", "0.5"),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -2),
        ("top_k", 1.5),
        ("min_p", 1.5),
        ("n", 0),
        ("n", True),
        ("max_tokens", 0),
        ("max_tokens", "10"),
        ("max_completion_tokens", 0),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -3),
        ("repetition_penalty", 0.0),
        ("seed", 2**70),
        ("seed", "1"),
        ("stop", ["a", "b", "c", "d", "e"]),
        ("stop", [1]),
        ("stop", [""]),
        ("stop_token_ids", [-1]),
        ("stop_token_ids", "1"),
        ("logprobs", 3),
        ("top_logprobs", 21),
        ("top_logprobs", -1),
        ("min_tokens", -1),
        ("ignore_eos", "yes"),
        ("user", 5),
        ("cache_salt", ""),
        ("stream", "true"),
        ("tools", [{"type": "function", "function": {"name": "f"}}]),
        ("tool_choice", "auto"),
        ("functions", [{"name": "f"}]),
        ("response_format", {"type": "json_object"}),
        ("logit_bias", {"1": 5}),
        ("stream_options", {"include_usage": True}),  # without stream
        ("model", ""),
        ("model", 3),
        ("messages", []),
        ("messages", "hi"),
    ],
)
def test_invalid_chat_fields(field: str, value: Any) -> None:
    e = err_of(chat, **{field: value})
    assert e.status == 400
    assert e.param is not None and e.param.split(".")[0] == field, e  # nested: "stop_token_ids.0"
    assert e.error_body()["error"]["type"] == "invalid_request_error"


def test_unsupported_fields_say_so() -> None:
    e = err_of(chat, tools=[{"type": "function"}])
    assert "not supported yet" in e.message and e.code == "unsupported_parameter"


def test_top_logprobs_requires_logprobs() -> None:
    e = err_of(chat, top_logprobs=3)
    assert e.param == "top_logprobs"
    assert chat(top_logprobs=0).top_logprobs == 0


@pytest.mark.parametrize(
    ("field", "value"),
    [("logprobs", 21), ("logprobs", True), ("echo", True), ("suffix", "x"), ("best_of", 2)],
)
def test_invalid_completion_fields(field: str, value: Any) -> None:
    e = err_of(comp, **{field: value})
    assert (e.status, e.param) == (400, field)


@pytest.mark.parametrize(
    ("message", "param"),
    [
        ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}, "messages.0.content"),
        ({"role": "user", "content": [{"type": "input_audio"}]}, "messages.0.content"),
        ({"role": "user", "content": [{"type": "text"}]}, "messages.0.content"),
        ({"role": "user", "content": [{"type": "weird", "text": "x"}]}, "messages.0.content"),
        ({"role": "user", "content": 5}, "messages.0.content"),
        # Null or missing content: OpenAI allows it only with tool_calls, which are not supported.
        ({"role": "user", "content": None}, "messages.0.content"),
        ({"role": "system", "content": None}, "messages.0.content"),
        ({"role": "assistant", "content": None}, "messages.0.content"),
        ({"role": "user"}, "messages.0.content"),
        ({"role": "robot", "content": "x"}, "messages.0.role"),
        ({"role": "tool", "content": "x", "tool_call_id": "1"}, "messages.0.role"),
        ({"content": "x"}, "messages.0.role"),
        ({"role": "assistant", "tool_calls": [{"id": "1"}]}, "tool_calls"),
        ("hello", "messages.0"),
    ],
)
def test_invalid_messages(message: Any, param: str) -> None:
    e = err_of(parse_request, ChatCompletionRequest, {"model": "m", "messages": [message]})
    assert (e.status, e.param) == (400, param), e


def test_image_part_message() -> None:
    e = err_of(chat, messages=[{"role": "user", "content": [{"type": "image_url"}]}])
    assert "image" in e.message and "not supported" in e.message


def test_content_parts_flatten() -> None:
    r = chat(
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]},
            {"role": "assistant", "content": ""},
        ]
    )
    assert [m.content for m in r.messages] == ["one\ntwo", ""]
    assert r.messages[0].text == "one\ntwo"


def test_raw_body_errors() -> None:
    e = err_of(parse_request, ChatCompletionRequest, b"{not json")
    assert (e.status, e.code) == (400, "invalid_json")
    e = err_of(parse_request, ChatCompletionRequest, b"[1, 2]")
    assert e.status == 400
    e = err_of(parse_request, ChatCompletionRequest, b"\xff\xfe")
    assert e.status == 400
    e = err_of(parse_request, ChatCompletionRequest, b"{" + b" " * 100 + b"}", max_body_bytes=50)
    assert e.status == 413
    e = err_of(parse_request, ChatCompletionRequest, b"[" * 100_000 + b"]" * 100_000)
    assert e.status == 400


# ------------------------------------------------------------------------------- sampling


def test_max_tokens_resolution() -> None:
    assert to_sampling_params(chat(), context_length=100, prompt_len=30).max_tokens == 70
    assert to_sampling_params(chat(), default_max_tokens=16, context_length=100, prompt_len=30).max_tokens == 16
    kw = {"context_length": 100, "prompt_len": 30}
    assert to_sampling_params(chat(max_tokens=8), **kw).max_tokens == 8
    r = chat(max_tokens=8, max_completion_tokens=9)
    assert to_sampling_params(r, context_length=100, prompt_len=30).max_tokens == 9
    assert to_sampling_params(chat(max_tokens=70), **kw).max_tokens == 70


def test_context_too_long() -> None:
    e = err_of(to_sampling_params, chat(max_tokens=71), context_length=100, prompt_len=30)
    assert (e.status, e.param, e.code) == (400, "max_tokens", "context_length_exceeded")
    e = err_of(to_sampling_params, chat(max_completion_tokens=71), context_length=100, prompt_len=30)
    assert e.param == "max_completion_tokens"
    e = err_of(to_sampling_params, chat(), context_length=100, prompt_len=100)
    assert (e.status, e.param) == (400, "messages")
    e = err_of(to_sampling_params, comp(), context_length=100, prompt_len=120)
    assert (e.status, e.param) == (400, "prompt")


def test_n_and_min_tokens() -> None:
    e = err_of(to_sampling_params, chat(n=2), context_length=100, prompt_len=1)
    assert (e.status, e.param) == (400, "n") and "n>1 is not supported" in e.message
    assert to_sampling_params(chat(n=1), context_length=100, prompt_len=1).max_tokens == 99
    e = err_of(to_sampling_params, chat(max_tokens=3, min_tokens=4), context_length=100, prompt_len=1)
    assert (e.status, e.param) == (400, "min_tokens")


def test_logprobs_mapping() -> None:
    kw = {"context_length": 100, "prompt_len": 1}
    assert to_sampling_params(chat(), **kw).logprobs is None
    assert to_sampling_params(chat(logprobs=True), **kw).logprobs == 0
    assert to_sampling_params(chat(logprobs=True, top_logprobs=7), **kw).logprobs == 7
    assert to_sampling_params(chat(logprobs=False, top_logprobs=0), **kw).logprobs is None
    assert to_sampling_params(comp(), **kw).logprobs is None
    assert to_sampling_params(comp(logprobs=0), **kw).logprobs == 0
    assert to_sampling_params(comp(logprobs=20), **kw).logprobs == 20


def test_defaults_map_to_sampling_params_defaults() -> None:
    sp = to_sampling_params(comp(), context_length=50, prompt_len=10)
    d = SamplingParams(max_tokens=40)
    assert sp == d


# ------------------------------------------------------------------------------- responses


def dump(m: BaseModel) -> dict[str, Any]:
    return json.loads(m.model_dump_json())


def test_chat_response_parses_with_openai_client() -> None:
    lp = ChatChoiceLogprobs(
        content=[
            ChatTokenLogprob.make("Hel", -0.1, [("Hel", -0.1), ("Hi", -2.5)]),
            ChatTokenLogprob.make("lo ☃", -0.2, []),
        ]
    )
    resp = ChatCompletionResponse(
        model="m",
        choices=[
            ChatCompletionChoice(
                index=0, message=ChatResponseMessage(content="Hello ☃"), logprobs=lp, finish_reason="stop"
            )
        ],
        usage=Usage.make(10, 2, cached_tokens=8),
    )
    parsed = oai_chat.ChatCompletion.model_validate(dump(resp))
    assert parsed.id.startswith("chatcmpl-")
    assert parsed.choices[0].message.content == "Hello ☃"
    assert parsed.choices[0].message.role == "assistant"
    assert parsed.choices[0].finish_reason == "stop"
    assert parsed.usage is not None and parsed.usage.total_tokens == 12
    assert parsed.usage.prompt_tokens_details is not None
    assert parsed.usage.prompt_tokens_details.cached_tokens == 8
    assert parsed.choices[0].logprobs is not None and parsed.choices[0].logprobs.content
    tok = parsed.choices[0].logprobs.content[1]
    assert bytes(tok.bytes or []).decode() == "lo ☃"
    assert parsed.choices[0].logprobs.content[0].top_logprobs[1].token == "Hi"


def test_chat_chunks_parse_with_openai_client() -> None:
    cid = "chatcmpl-1"
    chunks = [
        ChatCompletionChunk(
            id=cid,
            model="m",
            choices=[ChatCompletionChunkChoice(index=0, delta=DeltaMessage(role="assistant", content=""))],
        ),
        ChatCompletionChunk(
            id=cid,
            model="m",
            choices=[
                ChatCompletionChunkChoice(
                    index=0,
                    delta=DeltaMessage(content="Hi"),
                    logprobs=ChatChoiceLogprobs(content=[ChatTokenLogprob.make("Hi", -0.5)]),
                )
            ],
        ),
        ChatCompletionChunk(
            id=cid,
            model="m",
            choices=[ChatCompletionChunkChoice(index=0, delta=DeltaMessage(), finish_reason="length")],
        ),
        ChatCompletionChunk(id=cid, model="m", choices=[], usage=Usage.make(3, 1, 0)),
    ]
    parsed = [oai_chat.ChatCompletionChunk.model_validate(dump(c)) for c in chunks]
    assert parsed[0].choices[0].delta.role == "assistant"
    assert parsed[1].choices[0].delta.content == "Hi"
    assert parsed[2].choices[0].finish_reason == "length"
    assert parsed[3].choices == [] and parsed[3].usage is not None
    assert parsed[3].usage.prompt_tokens_details is not None
    # SSE line format the app will emit
    line = f"data: {chunks[1].model_dump_json()}\n\n"
    assert json.loads(line[len("data: ") :])["object"] == "chat.completion.chunk"


def test_completion_response_and_chunks_parse_with_openai_client() -> None:
    lp = CompletionLogprobs()
    lp.append("Hel", -0.1, [("Hel", -0.1), ("Hi", -2.0)], 0)
    lp.append("lo", -0.3, None, 3)
    resp = CompletionResponse(
        model="m",
        choices=[CompletionChoice(index=0, text="Hello", logprobs=lp, finish_reason="length")],
        usage=Usage.make(4, 2, 0),
    )
    parsed = oai.Completion.model_validate(dump(resp))
    assert parsed.id.startswith("cmpl-") and parsed.choices[0].text == "Hello"
    assert parsed.choices[0].logprobs is not None
    assert parsed.choices[0].logprobs.tokens == ["Hel", "lo"]
    assert parsed.choices[0].logprobs.text_offset == [0, 3]
    assert parsed.usage is not None and parsed.usage.completion_tokens == 2
    last = CompletionChunk(id="cmpl-1", model="m", choices=[CompletionChoice(index=0, text="!", finish_reason="stop")])
    assert oai.Completion.model_validate(dump(last)).choices[0].finish_reason == "stop"
    mid = CompletionChunk(id="cmpl-1", model="m", choices=[CompletionChoice(index=0, text="x")])
    # the openai client builds stream events without validation; finish_reason is null mid-stream
    assert dump(mid)["choices"][0] == {"index": 0, "text": "x", "logprobs": None, "finish_reason": None}
    usage_only = CompletionChunk(id="cmpl-1", model="m", choices=[], usage=Usage.make(1, 1))
    assert oai.Completion.model_validate(dump(usage_only)).usage is not None


def test_model_list_parses_with_openai_client() -> None:
    ml = ModelList(data=[ModelCard(id="smollm2", max_model_len=2048)])
    d = dump(ml)
    assert d["object"] == "list"
    m = oai.Model.model_validate(d["data"][0])
    assert m.id == "smollm2" and m.object == "model" and m.owned_by == "tandem"


# ------------------------------------------------------------------------------- fuzz

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
    "logprobs",
    "top_logprobs",
    "n",
    "ignore_eos",
    "min_tokens",
    "user",
    "cache_salt",
    "stream",
    "stream_options",
    "tools",
    "tool_choice",
    "response_format",
    "logit_bias",
    "echo",
    "suffix",
    "best_of",
    "include_usage",
    "role",
    "content",
    "type",
    "text",
]

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
    | st.sampled_from(["m", "user", "system", "assistant", "text", "image_url", "none", "auto"])
)
jsonish = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=4), children, max_size=4)
    ),
    max_leaves=12,
)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "developer", "tool", "x"])},
    optional={"content": jsonish, "name": jsonish},
)
request_dicts = st.fixed_dictionaries(
    {},
    optional={
        "model": st.just("m") | jsonish,
        "messages": st.lists(message, max_size=3) | jsonish,
        "prompt": st.text(max_size=5) | st.lists(st.integers(-2, 2**32), max_size=4) | jsonish,
        **{f: jsonish for f in FIELDS if f not in ("model", "messages", "prompt")},
    },
)

numbers = st.none() | st.integers(-3, 200) | st.floats(-3, 3) | st.booleans()
near_valid = st.fixed_dictionaries(
    {"model": st.just("m"), "messages": st.just(MSG), "prompt": st.just([1, 2])},
    optional={f: numbers for f in FIELDS if f not in ("model", "messages", "prompt")},
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    body=request_dicts | near_valid,
    ctx=st.integers(1, 64),
    plen=st.integers(0, 80),
    dflt=st.none() | st.integers(-1, 32),
)
def test_fuzz_only_openai_errors(body: dict[str, Any], ctx: int, plen: int, dflt: int | None) -> None:
    for cls in (ChatCompletionRequest, CompletionRequest):
        try:
            req = parse_request(cls, body)
            sp = to_sampling_params(req, default_max_tokens=dflt, context_length=ctx, prompt_len=plen)
            sp.validate()
            stop_strings(req)
        except OpenAIError as e:
            assert e.status in (400, 413)
            json.dumps(e.error_body())
        try:
            parse_request(cls, json.dumps(body, allow_nan=True).encode())
        except OpenAIError:
            pass


@settings(max_examples=100, deadline=None)
@given(raw=st.binary(max_size=64))
def test_fuzz_raw_bytes(raw: bytes) -> None:
    try:
        parse_request(ChatCompletionRequest, raw, max_body_bytes=48)
    except OpenAIError as e:
        assert e.status in (400, 413)
