"""A ``python -m tandem ...`` child process for end-to-end tests and benchmarks.

Its stdout and stderr are read into ``lines`` by a thread (so a chatty process never blocks on a
full pipe, and a failing assertion can show what it printed); ``wait_for`` finds a line by
pattern, ``stop`` asks it to exit with SIGINT and kills it if that takes too long.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time


class TandemProcess:
    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tandem", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            bufsize=1,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self._reader.start()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 120.0) -> re.Match[str]:
        """The first output line matching ``pattern``; AssertionError (with the output) if none
        comes within ``timeout`` seconds or the process exits first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if match := re.search(pattern, line):
                    return match
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(
            f"no line matching {pattern!r} from {self.proc.args} (exit code {self.proc.poll()}):\n{self.output}"
        )

    def wait(self, timeout: float) -> int:
        """The exit code, once the process exited and all its output was read."""
        code = self.proc.wait(timeout=timeout)
        self._reader.join(5)
        return code

    def kill(self) -> None:
        """SIGKILL (if still running) and reap it."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._reader.join(5)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGINT (a clean drain), then SIGKILL after ``timeout`` seconds."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
