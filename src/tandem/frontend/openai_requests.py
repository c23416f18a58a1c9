"""OpenAI request models, validated with OpenAI's ranges (the response models live in
``openai_responses``).

Requests
    :class:`ChatCompletionRequest` and :class:`CompletionRequest` ignore unknown fields (like
    OpenAI's tolerant servers) but reject fields this server knows it does not implement
    (``tools``, ``functions``, ``response_format`` other than text, ``logit_bias``, ``echo``,
    ``suffix``, image/audio content …) with a clear 400. Scalars are strict: ``"0.5"`` is not a
    temperature and ``true`` is not a token count. Parse with :func:`parse_request`, which turns
    every problem (malformed JSON, oversize body, bad field) into an
    :class:`~tandem.frontend.errors.OpenAIError`.

    After validation, ``ChatMessage.content`` is always a ``str`` (text parts joined with
    ``"\\n"``) and ``CompletionRequest.prompt`` is always ``str`` or ``list[int]``.

Responses (``tandem.frontend.openai_responses``)
    Pydantic models whose ``model_dump(mode="json")`` is what the official ``openai`` client
    parses (``ChatCompletion``, ``ChatCompletionChunk``, ``Completion``, ``Model`` …).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from tandem.frontend.errors import (
    bad_request,
    from_validation_error,
    malformed_json,
    payload_too_large,
)

MAX_STOP_SEQUENCES = 4
MAX_LOGPROBS = 20
MAX_N = 128

Temperature = Annotated[StrictFloat, Field(ge=0.0, le=2.0)]
TopP = Annotated[StrictFloat, Field(gt=0.0, le=1.0)]
MinP = Annotated[StrictFloat, Field(ge=0.0, le=1.0)]
Penalty = Annotated[StrictFloat, Field(ge=-2.0, le=2.0)]
RepetitionPenalty = Annotated[StrictFloat, Field(gt=0.0, le=100.0)]
PositiveInt = Annotated[StrictInt, Field(ge=1)]
NonNegInt = Annotated[StrictInt, Field(ge=0)]
TopK = Annotated[StrictInt, Field(ge=-1)]
Seed = Annotated[StrictInt, Field(ge=-(2**63), le=2**64 - 1)]
LogprobCount = Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)]
TokenId = Annotated[StrictInt, Field(ge=0, le=2**31 - 1)]


def _err(message: str, param: str | None = None, code: str | None = None) -> PydanticCustomError:
    """A validation error whose message is shown as-is and whose ``param`` is explicit."""
    ctx: dict[str, Any] = {"message": message}
    if param is not None:
        ctx["param"] = param
    if code is not None:
        ctx["code"] = code
    return PydanticCustomError("openai", "{message}", ctx)


def _unsupported(field: str, what: str = "") -> PydanticCustomError:
    return _err(f"'{field}' is not supported yet{': ' + what if what else ''}", field, "unsupported_parameter")


# --------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------

_IMAGE_PART_TYPES = {"image_url", "input_image", "image"}
_AUDIO_FILE_PART_TYPES = {"input_audio", "audio", "file", "input_file"}


def flatten_content(content: Any) -> str:
    """Turn OpenAI message content (a string or a list of text parts) into one string.

    Raises ValueError (→ 400) on image/audio/file parts and malformed parts.
    """
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError("content must be a string or a list of content parts")
    texts: list[str] = []
    for i, part in enumerate(content):
        if isinstance(part, str):  # tolerated by many servers
            texts.append(part)
            continue
        if not isinstance(part, dict):
            raise ValueError(f"content part {i} must be an object with 'type' and 'text'")
        ptype = part.get("type")
        if ptype == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise ValueError(f"content part {i} of type 'text' needs a string 'text'")
            texts.append(text)
        elif ptype in _IMAGE_PART_TYPES:
            raise ValueError("image content parts are not supported: this server serves text-only models")
        elif ptype in _AUDIO_FILE_PART_TYPES:
            raise ValueError(f"'{ptype}' content parts are not supported: only 'text' parts are")
        else:
            raise ValueError(f"unsupported content part type {ptype!r}: only 'text' parts are")
    return "\n".join(texts)


class ChatMessage(BaseModel):
    """One chat message. ``content`` is normalized to ``str`` after validation. It is required and
    may not be null: OpenAI allows a null (or missing) content only on an assistant message with
    ``tool_calls``, and tool calling is not supported yet."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: Any
    name: StrictStr | None = None

    @field_validator("role", mode="before")
    @classmethod
    def _role(cls, v: Any) -> Any:
        if v in ("tool", "function"):
            raise ValueError(f"'{v}' messages are not supported yet (no tool calling)")
        return v

    @field_validator("content", mode="after")
    @classmethod
    def _content(cls, v: Any) -> str:
        if v is None:
            raise ValueError("content must be a string or a list of content parts, not null")
        return flatten_content(v)

    @model_validator(mode="before")
    @classmethod
    def _no_tool_calls(cls, data: Any) -> Any:
        if isinstance(data, dict) and (data.get("tool_calls") or data.get("function_call")):
            raise _unsupported("tool_calls", "tool calling is not implemented")
        return data

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else flatten_content(self.content)

    def as_template_message(self) -> dict[str, str]:
        """``{"role", "content"}`` for a chat template; ``developer`` is mapped to ``system``."""
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": self.text}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: StrictBool | None = False
    continuous_usage_stats: StrictBool | None = False


def _normalize_stop(v: Any) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise ValueError("stop must be a string or a list of strings")
    if len(v) > MAX_STOP_SEQUENCES:
        raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {len(v)}")
    if any(s == "" for s in v):
        raise ValueError("stop sequences must be non-empty strings")
    return list(v)


class _SamplingFields(BaseModel):
    """Fields shared by chat and legacy completions."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: StrictStr
    max_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    min_p: MinP | None = None
    seed: Seed | None = None
    stop: list[str] = Field(default_factory=list)
    stop_token_ids: list[TokenId] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: RepetitionPenalty | None = None
    n: Annotated[StrictInt, Field(ge=1, le=MAX_N)] | None = None
    ignore_eos: StrictBool | None = None
    min_tokens: NonNegInt | None = None
    user: StrictStr | None = None
    cache_salt: StrictStr | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, Any] | None = None
    best_of: Any = None

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        if not v:
            raise ValueError("model must be a non-empty string")
        return v

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v: Any) -> list[str]:
        return _normalize_stop(v)

    @field_validator("cache_salt")
    @classmethod
    def _cache_salt(cls, v: str | None) -> str | None:
        if v is not None and v == "":
            raise ValueError("cache_salt must be a non-empty string when given")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: dict[str, Any] | None) -> None:
        if v:
            raise _unsupported("logit_bias")
        return None

    @field_validator("best_of", mode="before")
    @classmethod
    def _best_of(cls, v: Any) -> None:
        if v is None or (type(v) is int and v == 1):
            return None
        raise _unsupported("best_of", "only best_of=1 is supported")

    @model_validator(mode="after")
    def _cross_checks(self) -> _SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise _err("'stream_options' is only allowed when 'stream' is true", "stream_options")
        return self

    @property
    def include_usage(self) -> bool:
        """Whether a streaming response ends with a usage chunk."""
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: PositiveInt | None = None
    logprobs: StrictBool | None = False
    top_logprobs: LogprobCount | None = None
    # Known-unsupported fields: accepted only when they are absent/empty/no-ops.
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None

    @field_validator("tools", "functions", "audio", "prediction", mode="before")
    @classmethod
    def _reject_if_set(cls, v: Any, info: Any) -> None:
        if v:
            raise _unsupported(info.field_name)
        return None

    @field_validator("tool_choice", "function_call", mode="before")
    @classmethod
    def _tool_choice(cls, v: Any, info: Any) -> None:
        if v is None or v == "none":
            return None
        raise _unsupported(info.field_name, "tool calling is not implemented")

    @field_validator("response_format", mode="before")
    @classmethod
    def _response_format(cls, v: Any) -> None:
        if v is None or (isinstance(v, dict) and v.get("type") == "text"):
            return None
        raise _unsupported("response_format", "only {'type': 'text'} is supported")

    @field_validator("modalities", mode="before")
    @classmethod
    def _modalities(cls, v: Any) -> None:
        if v is None or v == ["text"]:
            return None
        raise _unsupported("modalities", "only ['text'] is supported")

    @model_validator(mode="after")
    def _chat_checks(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and self.top_logprobs > 0 and not self.logprobs:
            raise _err("'logprobs' must be true when 'top_logprobs' is used", "top_logprobs")
        return self


def _normalize_prompt(v: Any) -> str | list[int]:
    batch_msg = "batched prompts are not supported: send a single prompt (a string or a list of token ids) per request"

    def token_list(x: list[Any]) -> list[int]:
        if not x:
            raise ValueError("prompt must not be empty")
        for t in x:
            if type(t) is not int or not 0 <= t < 2**31:
                raise ValueError("token-id prompts must be lists of non-negative integers")
        return list(x)

    if isinstance(v, str):
        if v == "":
            raise ValueError("prompt must not be empty")
        return v
    if not isinstance(v, list):
        raise ValueError("prompt must be a string, a list of token ids, or a one-element list")
    if not v:
        raise ValueError("prompt must not be empty")
    first = v[0]
    if isinstance(first, str):
        if len(v) != 1:
            raise ValueError(batch_msg)
        return _normalize_prompt(first)
    if isinstance(first, list):
        if len(v) != 1:
            raise ValueError(batch_msg)
        return token_list(first)
    return token_list(v)


class CompletionRequest(_SamplingFields):
    prompt: str | list[int]
    logprobs: LogprobCount | None = None
    echo: StrictBool | None = False
    suffix: StrictStr | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v: Any) -> str | list[int]:
        return _normalize_prompt(v)

    @field_validator("echo")
    @classmethod
    def _echo(cls, v: bool | None) -> bool:
        if v:
            raise _unsupported("echo")
        return False

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v: str | None) -> None:
        if v:
            raise _unsupported("suffix")
        return None


RequestT = TypeVar("RequestT", ChatCompletionRequest, CompletionRequest)


def _may_hold_surrogates(body: bytes | bytearray | str) -> bool:
    """Cheap pre-check: ``json.loads`` decodes bytes with "surrogatepass", so a lone surrogate can
    come from a ``\\ud800`` escape, from CESU-8 style bytes (``\\xed\\xa0\\x80``) or from a UTF-16/32
    body; UTF-8 text without escapes holds none."""
    if isinstance(body, str):
        return True
    return b"\\u" in body or b"\xed" in body or body[:2] in (b"\xff\xfe", b"\xfe\xff") or b"\x00" in body[:4]


def _has_lone_surrogate(data: Any) -> bool:
    """Whether any string (key or value) in decoded JSON is not encodable as UTF-8.

    Such strings would fail later, far from the request (tokenizer, error rendering, request-plane
    frames), as 500s. Iterative: the depth is whatever ``json.loads`` accepted.
    """
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def parse_request(
    cls: type[RequestT], body: bytes | str | dict[str, Any], *, max_body_bytes: int | None = None
) -> RequestT:
    """Validate a raw body (or an already-decoded dict) into ``cls``.

    Raises :class:`OpenAIError` only: 413 for a body over ``max_body_bytes``, 400 for malformed
    JSON, a non-object body, or any invalid field (``param`` names the first bad field).
    """
    if isinstance(body, (bytes, bytearray, str)):
        size = len(body) if not isinstance(body, str) else len(body.encode("utf-8", "replace"))
        if max_body_bytes is not None and size > max_body_bytes:
            raise payload_too_large(max_body_bytes)
        try:
            data = json.loads(body)
        except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError
            raise malformed_json(str(e)[:200]) from None
        if _may_hold_surrogates(body) and _has_lone_surrogate(data):
            raise malformed_json("a string holds an unpaired UTF-16 surrogate (\\ud800-\\udfff), which is not text")
    else:
        data = body
    if not isinstance(data, dict):
        raise malformed_json("expected a JSON object at the top level")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise from_validation_error(e) from None
    except RecursionError:
        raise bad_request("Request body is nested too deeply") from None
