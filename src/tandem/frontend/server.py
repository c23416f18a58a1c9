"""Run the frontend under uvicorn inside the caller's event loop.

``FrontendServer`` binds the socket itself (so port 0 works and the real port is known before
serving), starts the ``Frontend`` (discovery, pool, stats), then serves until ``stop()``, which
closes the listening socket at once and gives requests in flight ``drain_timeout_s`` to finish
(``Frontend.begin_drain``). Signal handling stays with the caller (`tandem frontend`, `tandem serve`).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator

import uvicorn

from tandem.frontend.app import create_app
from tandem.frontend.config import FrontendConfig
from tandem.frontend.frontend import Frontend
from tandem.runtime.discovery.base import Discovery

_BACKSTOP_S = 5.0
"""Seconds uvicorn waits past the drain timeout for connections to close (error events to flush)."""


class _Server(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # the caller owns signals
        pass

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # uvicorn ≥ 0.29 name for the same hook
        yield


class FrontendServer:
    def __init__(self, config: FrontendConfig, discovery: Discovery, *, models: list[str] | None = None) -> None:
        self.config = config
        self.frontend = Frontend(config, discovery, models=models)
        self.app = create_app(self.frontend)
        self._socket: socket.socket | None = None
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        assert self._socket is not None, "start() first"
        host, port = self._socket.getsockname()[:2]
        return f"http://{host}:{port}"

    async def start(self) -> None:
        """Bind, start the frontend, and begin serving in the background."""
        family = socket.AF_INET6 if ":" in self.config.host else socket.AF_INET
        # proto=IPPROTO_TCP, not 0: asyncio turns Nagle off (TCP_NODELAY) only on connections
        # accepted from a socket that says it is TCP. With Nagle on, a keep-alive client waits
        # ~40 ms (delayed ACK) for every response whose headers and body go out as two writes.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.config.host, self.config.port))
        except OSError as exc:
            sock.close()
            raise OSError(f"cannot listen on {self.config.host}:{self.config.port}: {exc.strerror or exc}") from None
        sock.listen(2048)
        sock.setblocking(False)
        self._socket = sock
        await self.frontend.start()
        # uvicorn's own shutdown timeout cancels handlers (a traceback, a bare cut): it is only a
        # backstop here, past the frontend's drain, which ends late streams with an error event.
        uv_config = uvicorn.Config(
            self.app,
            log_level="warning",
            access_log=self.config.access_log,
            lifespan="off",
            # uvicorn annotates this int, but only hands it to asyncio.timeout(), which takes seconds
            # as a float: a fractional drain timeout is honoured as given.
            timeout_graceful_shutdown=self.config.drain_timeout_s + _BACKSTOP_S,  # type: ignore[arg-type]
            backlog=2048,
        )
        self._server = _Server(uv_config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what went wrong
            await asyncio.sleep(0.01)

    async def wait(self) -> None:
        """Until the server stops."""
        if self._task is not None:
            await self._task

    async def stop(self) -> None:
        self.frontend.begin_drain()
        if self._server is not None:
            self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.frontend.stop()
        if self._socket is not None:
            self._socket.close()
