"""Stopping long-running commands on SIGTERM / SIGINT."""

from __future__ import annotations

import asyncio
import os
import signal
import sys


class StopEvent(asyncio.Event):
    """Set by the first SIGTERM or SIGINT; ``signal`` is which one."""

    signal: int | None = None


def stop_event() -> StopEvent:
    """An event set by the first SIGTERM or SIGINT (call inside the running loop). A second
    signal exits at once (128 + its number) instead of waiting for a drain."""
    stop = StopEvent()
    loop = asyncio.get_running_loop()

    def on_signal(sig: int) -> None:
        if stop.is_set():
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(128 + sig)
        stop.signal = sig
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    return stop


def exit_code(stop: StopEvent) -> int:
    """Exit status after a clean stop: 130 (128 + SIGINT) after Ctrl-C, as shells expect of an
    interrupted command; 0 after SIGTERM, a supervisor's ordinary stop."""
    return 128 + signal.SIGINT if stop.signal == signal.SIGINT else 0
