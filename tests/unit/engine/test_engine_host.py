"""MainThreadEngineHost: the engine steps on the main thread while the asyncio side runs on
another thread held to one OpenMP thread; signals reach the asyncio side; every exit path
returns (or raises) instead of leaving the main thread stepping. A mocker engine stands in for
the model (what is tested is who steps it, not what a step computes)."""

from __future__ import annotations

import asyncio
import os
import signal
import threading

import pytest
import torch

from tandem.engine.async_engine import AsyncEngine
from tandem.engine.mocker import MockerConfig, MockerEngine
from tandem.protocols.sampling_params import SamplingParams
from tandem.worker.engine_host import MainThreadEngineHost


class RecordingMocker(MockerEngine):
    """A zero-delay mocker that records which threads stepped it."""

    def __init__(self) -> None:
        super().__init__(MockerConfig(speedup_ratio=0))
        self.step_threads: set[threading.Thread] = set()

    def step(self):
        self.step_threads.add(threading.current_thread())
        return super().step()


async def generate_tokens(engine: AsyncEngine, n: int) -> int:
    params = SamplingParams(max_tokens=n, ignore_eos=True)
    return sum([len(out.new_token_ids) async for out in engine.generate(list(range(10, 40)), params)])


def test_engine_steps_on_the_main_thread_and_the_io_thread_runs_one_openmp_thread():
    core = RecordingMocker()
    seen: dict = {}

    async def serve(host: MainThreadEngineHost) -> int:
        engine = AsyncEngine(core, own_thread=False)
        host.hand_over(engine, on_signal=lambda: None)
        seen["io_thread"] = threading.current_thread()
        seen["io_threads"] = torch.get_num_threads()
        seen["executor_threads"] = await asyncio.to_thread(torch.get_num_threads)
        seen["tokens"] = await generate_tokens(engine, 20)
        await asyncio.to_thread(engine.shutdown)
        return 7

    main_threads = torch.get_num_threads()
    assert MainThreadEngineHost(serve).run() == 7
    assert core.step_threads == {threading.main_thread()}
    assert seen["io_thread"] is not threading.main_thread()
    assert seen["io_threads"] == 1 and seen["executor_threads"] == 1
    assert torch.get_num_threads() == main_threads  # the main thread's own count is untouched
    assert seen["tokens"] == 20


def test_signals_on_the_main_thread_reach_the_asyncio_side_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)

    async def serve(host: MainThreadEngineHost) -> int:
        engine = AsyncEngine(RecordingMocker(), own_thread=False)
        got: asyncio.Queue[str] = asyncio.Queue()
        host.hand_over(engine, on_signal=lambda: got.put_nowait(threading.current_thread().name))
        await asyncio.sleep(0.2)  # the main thread installs its relay once it has the engine
        os.kill(os.getpid(), signal.SIGTERM)  # idle engine: the main thread waits for work
        first = await asyncio.wait_for(got.get(), 5)
        runner = asyncio.create_task(generate_tokens(engine, 200))  # busy engine
        await asyncio.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)
        second = await asyncio.wait_for(got.get(), 5)
        await runner
        assert first == second == threading.current_thread().name  # called on the asyncio loop
        engine.shutdown(wait=False)
        return 0

    assert MainThreadEngineHost(serve).run() == 0
    assert signal.getsignal(signal.SIGTERM) is before


def test_an_error_before_the_handover_is_raised_on_the_main_thread():
    async def serve(host: MainThreadEngineHost) -> int:
        raise ValueError("could not start")

    with pytest.raises(ValueError, match="could not start"):
        MainThreadEngineHost(serve).run()


def test_serve_ending_without_stopping_the_engine_still_returns():
    async def serve(host: MainThreadEngineHost) -> int:
        host.hand_over(AsyncEngine(RecordingMocker(), own_thread=False), on_signal=lambda: None)
        await asyncio.sleep(0.1)
        return 3  # the engine was never shut down: the host stops it

    assert MainThreadEngineHost(serve).run() == 3


def test_an_engine_that_dies_lets_the_asyncio_side_finish_its_shutdown():
    class Dying(RecordingMocker):
        def step(self):
            raise KeyboardInterrupt  # not an Exception: ends the engine thread at once

    async def serve(host: MainThreadEngineHost) -> int:
        engine = AsyncEngine(Dying(), own_thread=False)
        host.hand_over(engine, on_signal=lambda: None)
        with pytest.raises(Exception, match="engine failed"):
            await generate_tokens(engine, 5)
        assert isinstance(await engine.wait_stopped(), KeyboardInterrupt)
        await asyncio.sleep(0.1)  # cleanup after the engine died still runs
        return 1

    assert MainThreadEngineHost(serve).run() == 1


def test_run_refuses_a_non_main_thread():
    errors: list[BaseException] = []

    async def serve(host: MainThreadEngineHost) -> int:
        return 0

    def other() -> None:
        try:
            MainThreadEngineHost(serve).run()
        except RuntimeError as exc:
            errors.append(exc)

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert errors and "main thread" in str(errors[0])
