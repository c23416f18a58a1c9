"""The HTTP app: OpenAI routes, health, metrics, and OpenAI-style errors for everything.

Bodies are read by hand (not by FastAPI's model binding) so that an oversized body is cut off
at the limit (413) and malformed JSON gets OpenAI's 400 body; the request models still appear
in the OpenAPI schema. A client that disconnects cancels its request on the worker: streams
through Starlette's disconnect handling (and a shielded close of the body iterator), whole
responses by racing the generation against ``http.disconnect``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from tandem.frontend.errors import OpenAIError, error_body, internal_error, no_worker, payload_too_large
from tandem.frontend.frontend import Frontend
from tandem.frontend.generation import generate_chunks
from tandem.frontend.openai_requests import ChatCompletionRequest, CompletionRequest, RequestT, parse_request
from tandem.frontend.openai_responses import ModelCard, ModelList
from tandem.frontend.response_bodies import chat_full, chat_stream, completion_full, completion_stream

logger = logging.getLogger(__name__)

JSON = "application/json"


class ClientDisconnected(Exception):
    """The client went away before the whole response was ready."""


class _SSEResponse(StreamingResponse):
    """A StreamingResponse that always closes its body iterator, even when cancelled mid-send,
    so the worker request is cancelled at once rather than when the generator is collected."""

    def __init__(self, content: AsyncGenerator[bytes, None], media_type: str, headers: Mapping[str, str]) -> None:
        super().__init__(content, media_type=media_type, headers=headers)
        self._body = content  # the body iterator itself (starlette keeps an async iterable as given)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._body.aclose()


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise payload_too_large(limit)
    parts: list[bytes] = []
    size = 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise payload_too_large(limit)
        parts.append(part)
    return b"".join(parts)


async def until_disconnect(request: Request, work: Awaitable[Any]) -> Any:
    """Await ``work`` unless the client disconnects first (then cancel it, raise ClientDisconnected)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    raise ClientDisconnected


def _openapi_body(model: type[BaseModel], components: dict[str, Any]) -> dict[str, Any]:
    """An operation's JSON request body. Nested models go to ``components`` (see _add_components):
    pydantic's own ``#/$defs/...`` refs would point at the OpenAPI document's root and dangle."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(schema.pop("$defs", {}))
    return {"requestBody": {"required": True, "content": {JSON: {"schema": schema}}}}


def _add_components(app: FastAPI, components: dict[str, Any]) -> None:
    """Add ``components`` to ``#/components/schemas`` of the app's generated OpenAPI document."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            generate().setdefault("components", {}).setdefault("schemas", {}).update(components)
        schema = app.openapi_schema
        assert schema is not None  # generate() stored it
        return schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to extend the schema


def create_app(frontend: Frontend) -> FastAPI:
    app = FastAPI(title="Tandem", description="OpenAI-compatible LLM serving", version="0.1.0")
    metrics = frontend.metrics
    limit = frontend.config.max_body_bytes

    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        return JSONResponse(exc.error_body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(f"Invalid request: {exc.errors()[:1]}"), status_code=400)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error")
        err = internal_error()
        return JSONResponse(err.error_body(), status_code=err.status)

    async def generate(
        request: Request,
        cls: type[RequestT],
        endpoint: str,
        full: Callable[..., Awaitable[Any]],
        stream: Callable[..., AsyncGenerator[bytes, None]],
    ) -> Response:
        arrival = time.perf_counter()
        model = "unknown"
        status, streaming = 500, False
        try:
            parsed = parse_request(cls, await read_body(request, limit))
            model = parsed.model
            spec = await frontend.prepare(parsed, arrival)
            if not frontend.live_workers(spec.model):  # gone while tokenizing: 503 now, not in a 200 stream
                raise no_worker(spec.model)
            chunks = frontend.until_drained(generate_chunks(spec, frontend.dispatcher, metrics))
            if parsed.stream:
                status, streaming = 200, True  # counted when the stream ends
                body = _counted_stream(stream(chunks, spec.model, parsed.include_usage), model, endpoint)
                return _SSEResponse(
                    body,
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                )
            metrics.inflight.labels(model).inc()
            try:
                extra = (bool(getattr(parsed, "logprobs", False)),) if endpoint == "chat" else ()
                result = await until_disconnect(request, full(chunks, spec.model, *extra))
            finally:
                metrics.inflight.labels(model).dec()
            status = 200
            return Response(result.model_dump_json(), media_type=JSON)
        except OpenAIError as exc:
            status = exc.status
            raise
        except ClientDisconnected:
            status = 499
            metrics.cancellations.labels(model).inc()
            return Response(status_code=499)
        finally:
            if not streaming:  # a name no worker ever served is "unknown": clients must not mint label values
                label = model if model in frontend.known_models else "unknown"
                metrics.requests.labels(label, endpoint, str(status)).inc()

    async def _counted_stream(
        body: AsyncGenerator[bytes, None], model: str, endpoint: str
    ) -> AsyncGenerator[bytes, None]:
        metrics.inflight.labels(model).inc()
        status = "200"
        try:
            async for item in body:
                yield item
        except (asyncio.CancelledError, GeneratorExit):
            status = "499"
            metrics.cancellations.labels(model).inc()
            raise
        finally:
            await body.aclose()
            metrics.inflight.labels(model).dec()
            metrics.requests.labels(model, endpoint, status).inc()

    components: dict[str, Any] = {}
    _add_components(app, components)

    @app.post("/v1/chat/completions", openapi_extra=_openapi_body(ChatCompletionRequest, components))
    async def chat_completions(request: Request) -> Response:
        return await generate(request, ChatCompletionRequest, "chat", chat_full, chat_stream)

    @app.post("/v1/completions", openapi_extra=_openapi_body(CompletionRequest, components))
    async def completions(request: Request) -> Response:
        return await generate(request, CompletionRequest, "completions", completion_full, completion_stream)

    @app.get("/v1/models")
    async def list_models() -> Response:
        cards: dict[str, int] = {}  # model → its shortest context length
        for card in frontend.live_workers():
            length = min(card.context_length, cards.get(card.model, card.context_length))
            cards[card.model] = length
        body = ModelList(data=[ModelCard(id=name, max_model_len=length) for name, length in sorted(cards.items())])
        return Response(body.model_dump_json(), media_type=JSON)

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> Response:
        info = frontend.model_info(model)
        return Response(ModelCard(id=info.name, max_model_len=info.context_length).model_dump_json(), media_type=JSON)

    @app.get("/health")
    async def health() -> JSONResponse:
        body = frontend.health()
        return JSONResponse(body, status_code=200 if body["status"] == "ready" else 503)

    @app.get("/router/status")
    async def router_status() -> JSONResponse:
        return JSONResponse(frontend.router_status())

    @app.get("/live")
    async def live() -> JSONResponse:
        return JSONResponse({"status": "alive"})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
