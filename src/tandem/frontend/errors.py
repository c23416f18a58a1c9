"""OpenAI-style errors: an exception carrying the HTTP status and the ``{"error": {...}}`` body.

Every problem with a request surfaces as :class:`OpenAIError`; the HTTP layer turns it into a
JSON response with :meth:`OpenAIError.error_body` and :attr:`OpenAIError.status`.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from tandem.router.errors import NoWorkerError, RequestLostError, RouterError, WorkerRejectedError

INVALID_REQUEST = "invalid_request_error"
NOT_FOUND = "not_found_error"
SERVICE_UNAVAILABLE = "service_unavailable_error"
SERVER_ERROR = "server_error"


def error_body(
    message: str,
    type: str = INVALID_REQUEST,
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    """The JSON body OpenAI returns for an error: ``{"error": {message, type, param, code}}``."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class OpenAIError(Exception):
    """A request failure with an HTTP status and an OpenAI-style error body."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def error_body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def __repr__(self) -> str:
        return (
            f"OpenAIError(status={self.status}, message={self.message!r}, type={self.type!r}, "
            f"param={self.param!r}, code={self.code!r})"
        )


def bad_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    """400: an invalid or unsupported field."""
    return OpenAIError(400, message, INVALID_REQUEST, param, code)


def not_supported(field: str, what: str | None = None) -> OpenAIError:
    """400 for a field this server knows about but does not implement."""
    return bad_request(f"'{field}' is not supported yet{': ' + what if what else ''}", field, "unsupported_parameter")


def malformed_json(detail: str) -> OpenAIError:
    """400: the body is not valid JSON (or not a JSON object)."""
    return bad_request(f"Request body is not a valid JSON object: {detail}", None, "invalid_json")


def not_found_model(name: str) -> OpenAIError:
    """404: no such model, with OpenAI's ``model_not_found`` code."""
    return OpenAIError(404, f"The model '{name}' does not exist.", INVALID_REQUEST, "model", "model_not_found")


def context_too_long(
    context_length: int,
    prompt_tokens: int,
    max_tokens: int | None = None,
    param: str = "messages",
) -> OpenAIError:
    """400: prompt (plus requested completion) does not fit in the model's context window."""
    if max_tokens is None:
        msg = (
            f"This model's maximum context length is {context_length} tokens. However, your "
            f"prompt has {prompt_tokens} tokens, leaving no room for a completion. "
            "Please reduce the length of the prompt."
        )
    else:
        msg = (
            f"This model's maximum context length is {context_length} tokens. However, you "
            f"requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, "
            f"{max_tokens} in the completion). Please reduce the length of the prompt or "
            "the completion."
        )
    return OpenAIError(400, msg, INVALID_REQUEST, param, "context_length_exceeded")


def payload_too_large(limit: int) -> OpenAIError:
    """413: the request body is over ``limit`` bytes."""
    return OpenAIError(
        413,
        f"Request body is too large: the limit is {limit} bytes.",
        INVALID_REQUEST,
        None,
        "request_too_large",
    )


def no_worker(model: str) -> OpenAIError:
    """503: the model is known but no worker currently serves it."""
    return OpenAIError(
        503,
        f"No worker is currently serving model '{model}'. Please retry later.",
        SERVICE_UNAVAILABLE,
        "model",
        "no_worker_available",
    )


def shutting_down(drain_timeout_s: float) -> OpenAIError:
    """503: the server stopped and the request did not finish within its drain timeout."""
    return OpenAIError(
        503,
        f"The server is shutting down and the request did not finish within {drain_timeout_s:g}s. Please retry.",
        SERVICE_UNAVAILABLE,
        None,
        "server_shutting_down",
    )


def internal_error(message: str = "Internal server error") -> OpenAIError:
    """500: an unexpected failure (never leak tracebacks into the body)."""
    return OpenAIError(500, message, SERVER_ERROR, None, "internal_error")


def _loc_to_param(loc: tuple[int | str, ...]) -> str | None:
    """``("messages", 0, "content")`` → ``"messages.0.content"``; ``()`` → None.

    Pydantic adds union-member / function tags to locations (e.g. ``"function-after[...]"``,
    ``"list[int]"``); those are dropped so the param names only request fields and indices.
    """
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(str(item))
        elif "[" in item or item.startswith("function-"):
            continue
        else:
            parts.append(item)
    return ".".join(parts) or None


def from_validation_error(exc: ValidationError) -> OpenAIError:
    """A 400 naming the first bad field as ``param``.

    Validators may raise ``PydanticCustomError("openai", msg, {"param": ...})`` to set the
    param explicitly (cross-field checks whose location would otherwise be the whole body).
    """
    errors = exc.errors(include_url=False)
    if not errors:  # pragma: no cover - pydantic always reports at least one
        return bad_request("Invalid request")
    first = errors[0]
    ctx = first.get("ctx") or {}
    param = ctx.get("param") if isinstance(ctx.get("param"), str) else None
    if param is None:
        param = _loc_to_param(tuple(first.get("loc", ())))
    msg = str(first.get("msg", "invalid value"))
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if first.get("type") == "missing":
        msg = f"'{param}' is a required property" if param else "Missing required field"
    elif param and not msg.startswith(f"'{param}'"):
        msg = f"Invalid value for '{param}': {msg}"
    code = ctx.get("code") if isinstance(ctx.get("code"), str) else None
    return bad_request(msg, param, code)


def from_router_error(exc: RouterError) -> OpenAIError:
    """The HTTP face of a dispatch failure (tandem.router.errors)."""
    if isinstance(exc, NoWorkerError):
        return no_worker(exc.model)
    if isinstance(exc, WorkerRejectedError):
        return bad_request(exc.message, "messages")
    if isinstance(exc, RequestLostError):
        return OpenAIError(502, exc.message, "server_error", None, exc.code)
    return OpenAIError(500, exc.message, "server_error")
