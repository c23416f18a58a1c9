"""A worker process whose engine steps on the main thread, its asyncio loop on a second thread.

Why the main thread: PyTorch on CPU runs its parallel regions on libgomp (GNU OpenMP). Every
thread that starts a parallel region gets a team of its own, and libgomp lets idle team threads
spin-wait for the next region only while the threads it manages, across all teams, do not
outnumber the CPUs; past that it throttles spinning to almost nothing, so each of the hundreds of
parallel regions of a decode step wakes sleeping threads through the kernel. A worker that loaded
the model on one thread and stepped it on another had two teams: on a 2-core machine its decode
took 47 ms/token where the same engine on one thread took 30 ms (SmolLM2-135M, bf16).

So, like vLLM's engine core busy loop, the main thread loads the model and steps the engine,
and is the only thread that starts parallel regions: the asyncio thread (request plane,
discovery, KV events) and its executor threads are held to one OpenMP thread, which runs any
tensor op there inline instead of starting another team. Signals, which Python delivers only to
the main thread, are relayed to the asyncio loop.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from tandem.engine.async_engine import AsyncEngine

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def hold_to_one_openmp_thread() -> None:
    """Make tensor ops on the calling thread run inline: it never starts an OpenMP team.

    ``torch.set_num_threads`` sets the calling thread's OpenMP thread count (other threads,
    the engine's included, keep theirs)."""
    torch.set_num_threads(1)


@dataclass
class EngineHandoff:
    """What the asyncio side gives the main thread once its services exist."""

    engine: AsyncEngine
    """Created with ``own_thread=False``; the main thread steps it."""
    loop: asyncio.AbstractEventLoop
    on_signal: Callable[[], None]
    """Called on ``loop`` for each SIGTERM/SIGINT the main thread receives."""


class MainThreadEngineHost:
    """Runs ``serve(host)`` on an asyncio thread while the main thread steps the engine.

    ``serve`` creates its `AsyncEngine` with ``own_thread=False`` and calls `hand_over` once it
    is ready to take signals; `run` (on the main thread) then steps that engine until it is shut
    down, and returns ``serve``'s result. If ``serve`` ends without handing an engine over (a
    start-up error), `run` returns at once with its result or raises its exception."""

    def __init__(self, serve: Callable[[MainThreadEngineHost], Coroutine[Any, Any, int]]) -> None:
        self._serve = serve
        self._handoff: Future[EngineHandoff | None] = Future()
        self._result: Future[int] = Future()

    def hand_over(self, engine: AsyncEngine, on_signal: Callable[[], None]) -> None:
        """Called on the asyncio thread: the main thread starts stepping ``engine`` and relaying signals."""
        if not self._handoff.done():
            self._handoff.set_result(EngineHandoff(engine, asyncio.get_running_loop(), on_signal))

    def run(self) -> int:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("MainThreadEngineHost.run must be called on the main thread")
        io_thread = threading.Thread(target=self._io_main, name="tandem-worker-io", daemon=True)
        io_thread.start()
        handoff = self._handoff.result()
        if handoff is not None:
            previous = {sig: signal.signal(sig, self._relay(handoff)) for sig in STOP_SIGNALS}
            try:
                handoff.engine.run()  # returns once the asyncio side shuts the engine down, or it dies
            finally:
                # The engine may have died: the asyncio side still drains; signals keep relaying until then.
                result = self._result.result()
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
            io_thread.join()
            return result
        io_thread.join()
        return self._result.result()

    @staticmethod
    def _relay(handoff: EngineHandoff) -> Callable[[int, Any], None]:
        def relay(signum: int, frame: Any) -> None:
            try:
                handoff.loop.call_soon_threadsafe(handoff.on_signal)
            except RuntimeError:  # the loop is closed: the process is on its way out
                pass

        return relay

    def _io_main(self) -> None:
        hold_to_one_openmp_thread()
        try:
            self._result.set_result(asyncio.run(self._serve_with_quiet_executor()))
        except BaseException as exc:  # handed to the main thread, which raises it
            self._result.set_exception(exc)
        finally:
            if not self._handoff.done():
                self._handoff.set_result(None)
            else:  # normally stopped already (drain); never leave the main thread stepping forever
                handoff = self._handoff.result()
                if handoff is not None:
                    handoff.engine.shutdown(wait=False)

    async def _serve_with_quiet_executor(self) -> int:
        # asyncio.to_thread's worker threads are new threads: hold them to one OpenMP thread too.
        executor = ThreadPoolExecutor(thread_name_prefix="tandem-worker-io", initializer=hold_to_one_openmp_thread)
        asyncio.get_running_loop().set_default_executor(executor)
        return await self._serve(self)
