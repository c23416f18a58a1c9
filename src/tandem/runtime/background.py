"""Fire-and-forget coroutines that are not garbage-collected while they run.

The event loop keeps only a weak reference to a task: one that nobody holds may vanish mid-run
(Python's asyncio docs, ``create_task``). :func:`spawn` keeps a strong reference until it is done.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

_running: set[asyncio.Future[Any]] = set()


def spawn(work: Awaitable[Any]) -> asyncio.Future[Any]:
    """Schedule ``work`` on the running loop and hold it until it finishes."""
    task = asyncio.ensure_future(work)
    _running.add(task)
    task.add_done_callback(_running.discard)
    return task
