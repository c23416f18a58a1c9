"""Asyncio front of the builtin engine: one thread steps the engine while callers stream
outputs from per-request queues.

By default that thread is a background thread of its own. A worker process instead passes
``own_thread=False`` and calls `AsyncEngine.run` on its main thread (the engine's OpenMP fast
path needs that: see ``tandem.worker.engine_host``), its asyncio loop running on another thread.

The engine thread owns the ``EngineCore`` outright: callers never touch it directly, they post
commands (add, abort, or a function to run between steps) into a thread-safe inbox. PyTorch
releases the GIL inside its kernels, so the event loop stays responsive while a step runs.
An exception inside a step fails the requests of that step, never the thread. A fatal one
(`EngineFatalError`, or ``max_step_failures`` failed steps in a row: the engine itself is broken)
ends the thread: every request fails with `EngineDeadError`, new ones are refused, and
`wait_stopped()` returns the cause, so the worker can deregister and exit for a restart.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import Future
from typing import Any, TypeAlias, TypeVar

from tandem.engine.engine_core import EngineCore
from tandem.engine.faults import engine_fault_from_env
from tandem.engine.outputs import RequestOutput
from tandem.protocols.endpoints import EngineStats
from tandem.protocols.kv_events import KVEventBatch
from tandem.protocols.sampling_params import SamplingParams

logger = logging.getLogger(__name__)
T = TypeVar("T")
_StreamItem: TypeAlias = RequestOutput | BaseException
"""What a request's stream queue carries: its outputs, or the error that ends it."""


class EngineStepError(RuntimeError):
    """An engine step raised: its requests were aborted (the engine itself goes on, until
    ``max_step_failures`` steps in a row fail). Another engine can serve them."""


class EngineDeadError(RuntimeError):
    """The engine thread has stopped; no request can be served."""


class EngineFatalError(RuntimeError):
    """Raised inside a step: the engine cannot go on (its thread ends)."""


class AsyncEngine:
    def __init__(
        self,
        engine: EngineCore,
        kv_event_sink: Callable[[int, KVEventBatch], None] | None = None,
        max_step_failures: int = 3,
        own_thread: bool = True,
    ) -> None:
        self.core = engine
        self.kv_event_sink = kv_event_sink
        """Called on the engine thread with (sequence number, batch) after each step that changed
        the prefix cache (e.g. a ZMQ publisher)."""
        self.max_step_failures = max_step_failures
        """Failed steps in a row after which the engine is declared dead (default 3)."""
        self.failure: BaseException | None = None
        """What killed the engine thread; None while it runs or after a clean `shutdown`."""
        self._fault = engine_fault_from_env()  # tests only (engine/faults.py)
        self._num_steps = self._failed_steps = 0
        self._exit: Future[BaseException | None] = Future()
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[_StreamItem]]] = {}
        self._on_finish: dict[str, Callable[[EngineCore], Any]] = {}
        self._wakeup = threading.Event()
        self._stopped = False
        self._ids = itertools.count()
        if engine.tiers is not None:
            engine.tiers.on_events = self._wakeup.set
        self._stats = engine.stats()
        self._thread: threading.Thread | None = None
        """The thread that steps the engine; None until `run` starts on the caller's thread."""
        if own_thread:
            self._thread = threading.Thread(target=self.run, name="tandem-engine", daemon=True)
            self._thread.start()

    # --- caller side (any thread with an event loop) ---

    async def generate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        cache_salt: str | None = None,
        on_finish: Callable[[EngineCore], Any] | None = None,
        prompt_validated: bool = False,
    ) -> AsyncGenerator[RequestOutput, None]:
        """Stream a request's outputs; leaving the iterator early aborts the request.

        The prompt is validated once, on the engine thread (a bad one raises ValueError from the
        iterator), unless ``prompt_validated`` says the caller already ran ``validate_prompt``.

        ``on_finish(engine)`` runs on the engine thread right after the step that finished the
        request, before the next step (so its prompt's cached blocks are still there, and nothing
        waits a step for it); its result rides on the final output as ``on_finish_result``. A
        prefill worker exports the prompt's KV this way. If it raises, the result is None."""
        if self._stopped:
            raise self._dead_error()
        request_id = request_id or f"req-{next(self._ids)}"
        stream: asyncio.Queue[_StreamItem] = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), stream)
        if self._stopped:  # the thread ended after the check above: it may not have seen this stream
            self._streams.pop(request_id, None)
            raise self._dead_error()
        if on_finish is not None:
            self._on_finish[request_id] = on_finish
        self._post("add", (request_id, prompt_token_ids, params, cache_salt, prompt_validated))
        finished = False
        held: BaseException | None = None  # an item taken from the queue but not yet handed out
        try:
            while True:
                item = held if held is not None else await stream.get()
                held = None
                if isinstance(item, BaseException):
                    raise item
                # A consumer that fell behind gets everything queued as one delta, so it catches
                # up in one step instead of paying its per-delta cost for every engine step.
                while not item.finished and not stream.empty():
                    nxt = stream.get_nowait()
                    if isinstance(nxt, BaseException):
                        held = nxt
                        break
                    item = item.merge(nxt)
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            self._on_finish.pop(request_id, None)
            if not finished:
                self._post("abort", request_id)

    def abort(self, request_id: str) -> None:
        self._post("abort", request_id)

    async def call(self, fn: Callable[[EngineCore], T]) -> T:
        """Run ``fn(engine)`` on the engine thread between steps (export/import KV, reset cache...)."""
        if self._stopped:
            raise self._dead_error()
        future: Future[T] = Future()
        self._post("call", (fn, future))
        if self._stopped:  # the thread ended meanwhile and may never run it
            self._fail_calls(self._dead_error())
        return await asyncio.wrap_future(future)

    @property
    def block_size(self) -> int:
        return self.core.block_size

    @property
    def num_kv_blocks(self) -> int:
        return self.core.pool.num_blocks

    @property
    def max_model_len(self) -> int:
        return self.core.max_model_len

    def validate_prompt(self, prompt_token_ids: list[int]) -> None:
        """Raise ValueError if the engine cannot take this prompt (any thread: reads only the config)."""
        self.core.validate_prompt(prompt_token_ids)

    def stats(self) -> EngineStats:
        """The snapshot taken after the latest step."""
        return self._stats

    def shutdown(self, timeout: float = 10.0, wait: bool = True) -> None:
        """Stop stepping and, with ``wait``, wait (up to ``timeout``) until the engine thread has
        left its loop."""
        self._post("stop", None)
        if wait and self._thread is not threading.current_thread():
            try:
                self._exit.result(timeout)
            except TimeoutError:
                logger.warning("engine thread still busy %.1fs after shutdown was asked", timeout)

    @property
    def is_running(self) -> bool:
        """True until the engine stops (also before `run` is entered on a caller's thread)."""
        return not self._stopped and (self._thread is None or self._thread.is_alive())

    async def wait_stopped(self) -> BaseException | None:
        """Wait for the engine thread to end: None after `shutdown`, else what killed it."""
        return await asyncio.shield(asyncio.wrap_future(self._exit))

    def _dead_error(self) -> EngineDeadError:
        if self.failure is None:
            return EngineDeadError("engine is stopped")
        return EngineDeadError(f"engine failed: {self.failure}")

    def _post(self, kind: str, payload: Any) -> None:
        self._inbox.put((kind, payload))
        self._wakeup.set()

    # --- engine thread ---

    def run(self) -> None:
        """Step the engine on the calling thread until `shutdown` or a fatal failure.

        Called once: by the background thread (``own_thread=True``) or by the owner of an
        ``own_thread=False`` engine, typically the process's main thread."""
        if self._thread is not None and self._thread is not threading.current_thread():
            raise RuntimeError("this engine is already stepped by another thread")
        self._thread = threading.current_thread()
        self._run()

    def _run(self) -> None:
        try:
            while not self._stopped:
                self._drain_inbox()
                if self._stopped:
                    break
                if not self.core.has_unfinished_requests:
                    # Idle: events of background work (a restarted disk tier announcing its
                    # blocks, disk writes finishing) still go out: the tiers wake this loop.
                    self._publish_kv_events()
                    self._stats = self.core.stats()
                    self._wakeup.wait()
                    self._wakeup.clear()
                    continue
                self._step()
        except BaseException as exc:  # whatever ends the thread is reported, not lost
            logger.critical("engine thread died: %s", exc, exc_info=exc)
            self.failure = exc
        finally:
            self._stopped = True
            dead = self._dead_error()
            try:
                self._fail_all(dead)
                self._fail_calls(dead)
            finally:
                try:
                    self.core.close()
                except Exception:
                    logger.exception("closing the engine failed")
                self._exit.set_result(self.failure)

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                request_id, prompt, params, salt, validated = payload
                try:
                    self.core.add_request(request_id, prompt, params, cache_salt=salt, prompt_validated=validated)
                except Exception as exc:  # a bad request fails alone
                    self._deliver(request_id, exc)
            elif kind == "abort":
                self.core.abort_request(payload)
            elif kind == "call":
                fn, future = payload
                if not future.set_running_or_notify_cancel():
                    continue  # the caller gave up (was cancelled) before it ran
                try:
                    future.set_result(fn(self.core))
                except Exception as exc:
                    future.set_exception(exc)
            elif kind == "stop":
                self._stopped = True
                return

    def _step(self) -> None:
        try:
            if self._fault is not None and self._fault.fails_at(self._num_steps):
                raise EngineFatalError(f"injected fault ({self._fault}) after {self._num_steps} steps")
            outputs = self.core.step()
        except EngineFatalError:
            raise
        except Exception as exc:
            self._failed_steps += 1
            if self._failed_steps >= self.max_step_failures:
                raise EngineFatalError(f"{self._failed_steps} steps failed in a row; the last: {exc}") from exc
            logger.exception("engine step failed; aborting its requests")
            for request_id in list(self.core.requests):
                self.core.abort_request(request_id)
                self._deliver(request_id, EngineStepError(f"engine step failed: {exc}"))
            return
        self._num_steps += 1
        self._failed_steps = 0
        for out in outputs:
            if out.finished and self._on_finish:
                hook = self._on_finish.pop(out.request_id, None)
                if hook is not None:
                    try:
                        out.on_finish_result = hook(self.core)
                    except Exception:
                        logger.exception("on_finish hook of %s failed", out.request_id)
            self._deliver(out.request_id, out)
        self._publish_kv_events()
        self._stats = self.core.stats()

    def _publish_kv_events(self) -> None:
        batch = self.core.take_kv_event_batch()  # always drained, so events never pile up
        if batch is not None and self.kv_event_sink is not None:
            self.kv_event_sink(*batch)

    def _deliver(self, request_id: str, item: _StreamItem) -> None:
        target = self._streams.get(request_id)
        if target is None:
            return
        loop, stream = target
        try:
            loop.call_soon_threadsafe(stream.put_nowait, item)
        except RuntimeError:  # the caller's loop is closed
            self.core.abort_request(request_id)

    def _fail_all(self, exc: BaseException) -> None:
        for request_id in list(self._streams):
            self._deliver(request_id, exc)

    def _fail_calls(self, exc: BaseException) -> None:
        """Fail the `call`s still queued (the thread that would run them is gone)."""
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "call" and payload[1].set_running_or_notify_cancel():
                payload[1].set_exception(exc)
