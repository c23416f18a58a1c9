"""Request-plane keepalive: notice a peer that went silent without closing the connection.

A frozen host or a dead link (cable cut, ``ip link set down``, packets dropped by a firewall)
sends no reset, so its TCP connection looks open for many minutes. While a connection has open
streams, a `Keepalive` sends a Ping every ``interval`` seconds; the peer's read loop answers each
with a Pong. Anything received (a Pong or any other frame) proves the peer alive. Silence for
``timeout`` seconds declares the connection lost. Idle connections are neither pinged nor judged:
silence is normal there.

Both ends of the request plane run one per connection (RequestPlaneConfig.keepalive_interval and
keepalive_timeout).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class Keepalive:
    """Pings one connection while it has streams; calls ``on_lost(reason)`` once on silence."""

    def __init__(
        self,
        interval: float,
        timeout: float,
        *,
        has_streams: Callable[[], bool],
        send_ping: Callable[[], None],
        on_lost: Callable[[str], None],
        name: str,
    ) -> None:
        self.interval, self.timeout = interval, timeout
        self._has_streams, self._send_ping, self._on_lost = has_streams, send_ping, on_lost
        self.last_heard = time.monotonic()
        """When the peer last sent anything (monotonic seconds)."""
        self._task = asyncio.create_task(self._run(), name=f"keepalive {name}")

    def heard(self) -> None:
        """The peer sent something: it is alive. (Also called when the first stream of an idle
        connection opens: silence counts from then.)"""
        self.last_heard = time.monotonic()

    def stop(self) -> None:
        self._task.cancel()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            now = time.monotonic()
            if not self._has_streams():
                self.last_heard = now  # idle: nothing to judge
                continue
            if now - self.last_heard >= self.timeout:
                self._on_lost(f"no keepalive answer for {self.timeout:g} s")
                return
            self._send_ping()
