"""An in-process deployment for frontend tests: memory discovery, mocker workers, a real HTTP frontend.

Everything runs on one asyncio loop in a background thread, so plain (synchronous) tests talk
to the frontend over real HTTP on 127.0.0.1 with ``requests`` or the ``openai`` client, and use
:meth:`Deployment.run` to act on the deployment (start or drain a worker, register a card).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import threading
import uuid
from collections.abc import Coroutine
from typing import Any, TypeVar

from tandem.engine.async_engine import AsyncEngine
from tandem.engine.mocker import MockerConfig, MockerEngine
from tandem.frontend.config import FrontendConfig
from tandem.frontend.server import FrontendServer
from tandem.protocols.worker_card import WorkerCard
from tandem.runtime.discovery import make_discovery
from tandem.runtime.discovery.base import Discovery, Registration
from tandem.worker.service import WorkerService

TOKENIZER = "smollm2-135m-instruct"
T = TypeVar("T")


class Deployment:
    """A background event loop holding one memory discovery, its workers and frontends."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="frontend-test-loop", daemon=True)
        self._thread.start()
        self.discovery_spec = f"memory:frontend-test-{uuid.uuid4().hex}"
        self.discovery: Discovery = self.run(self._make_discovery())
        self.workers: list[WorkerService] = []
        self.frontends: list[FrontendServer] = []
        self.registrations: list[Registration] = []

    async def _make_discovery(self) -> Discovery:
        return make_discovery(self.discovery_spec)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        """Run ``coro`` on the deployment's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def add_worker(self, model: str, **mocker: Any) -> WorkerService:
        """Start a mocker worker (no modeled sleeps) serving ``model`` with the SmolLM2 tokenizer."""

        async def start() -> WorkerService:
            core = MockerEngine(MockerConfig(speedup_ratio=0, **mocker))
            service = WorkerService(
                AsyncEngine(core),
                self.discovery,
                model_name=model,
                tokenizer_source=TOKENIZER,
                engine_kind="mocker",
                ttl_s=30.0,
            )
            await service.start()
            return service

        service = self.run(start())
        self.workers.append(service)
        return service

    def drain(self, service: WorkerService) -> None:
        self.run(service.drain(timeout=2))
        self.workers.remove(service)

    def register_dead_worker(self, model: str, worker_id: str) -> WorkerCard:
        """Register a card whose request-plane port has nothing listening."""
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        card = WorkerCard(
            worker_id=worker_id,
            model=model,
            tokenizer=TOKENIZER,
            chat_template=TOKENIZER,
            context_length=8192,
            block_size=16,
            total_kv_blocks=1024,
            request_plane_address=f"127.0.0.1:{port}",
            engine="mocker",
        )

        async def register() -> Registration:
            return await self.discovery.register(card, 30.0)

        self.registrations.append(self.run(register()))
        return card

    def add_frontend(
        self, config: FrontendConfig, discovery: Discovery | None = None, models: list[str] | None = None
    ) -> FrontendServer:
        async def start() -> FrontendServer:
            server = FrontendServer(config, discovery or self.discovery, models=models)
            await server.start()
            return server

        server = self.run(start())
        self.frontends.append(server)
        return server

    def close(self) -> None:
        async def stop() -> None:
            for server in self.frontends:
                await server.stop()
            for registration in self.registrations:
                await registration.withdraw()
            for service in self.workers:
                await service.drain(timeout=1)

        try:
            self.run(stop(), timeout=30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
            self.loop.close()


def assert_openai_error(status: int, body: Any, expected_status: int | None = None) -> dict[str, Any]:
    """``body`` is OpenAI's ``{"error": {"message", "type", "param", "code"}}``; returns the inner dict."""
    if expected_status is not None:
        assert status == expected_status, (status, body)
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    assert error["param"] is None or isinstance(error["param"], str), error
    assert error["code"] is None or isinstance(error["code"], str), error
    return error


def raw_request(
    url: str, method: str, path: str, headers: dict[str, str], body_parts: list[bytes], chunked: bool
) -> tuple[int, bytes]:
    """Send a request on a raw socket (body as given, optionally with chunked framing) and read the reply.

    A server may answer (413) before reading the whole body and then close: sending errors are
    ignored so the answer can still be read.
    """
    host, port = url.removeprefix("http://").split(":")
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if chunked:
        lines.append("Transfer-Encoding: chunked")
        payload = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in body_parts if p) + b"0\r\n\r\n"
    else:
        payload = b"".join(body_parts)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        try:
            sock.sendall("\r\n".join(lines).encode() + b"\r\n\r\n" + payload)
        except (BrokenPipeError, ConnectionResetError):
            pass
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, response.read()


def json_or_text(content: bytes) -> Any:
    try:
        return json.loads(content)
    except ValueError:
        return content.decode("utf-8", "replace")
