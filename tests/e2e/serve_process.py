"""`tandem serve` as a real child process for end-to-end tests: start, wait for ready, stop.

Output (stdout and stderr, the workers' included) is read by a thread into ``lines``, so a test
can wait for the "Tandem is serving" line with a bounded timeout and show everything the
server said when something goes wrong.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time

import psutil

_READY = re.compile(r"^Tandem is serving .* at (http://\S+)/v1 ")


class ServeProcess:
    """``python -m tandem serve ARGS`` with its output captured line by line."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, new_session: bool = False) -> None:
        """``env``: variables added to this process's environment (the workers inherit them).
        ``new_session``: start it in a session (and process group) of its own, so that
        `kill_group` reaches everything it started, grandchildren included (vLLM's engine cores)."""
        self.argv = [sys.executable, "-m", "tandem", "serve", *args]
        self.proc = subprocess.Popen(
            self.argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            stdin=subprocess.DEVNULL,
            bufsize=1,
            env=None if env is None else {**os.environ, **env},
            start_new_session=new_session,
        )
        self.new_session = new_session
        self.lines: list[str] = []
        self.url: str | None = None
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            match = _READY.match(line)
            if match and self.url is None:
                self.url = match.group(1)
                self._ready.set()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_ready(self, timeout: float = 120.0) -> str:
        """The server's base URL (http://host:port) once it says it is serving."""
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.2):
            if self.proc.poll() is not None:
                self._reader.join(5)
                raise AssertionError(
                    f"tandem serve exited with {self.proc.returncode} before it was ready:\n{self.output}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"tandem serve not ready within {timeout:.0f}s:\n{self.output}")
        assert self.url is not None
        return self.url

    def wait_for_line(self, needle: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(needle in line for line in list(self.lines)):
                return True
            time.sleep(0.1)
        return False

    def worker_processes(self) -> list[psutil.Process]:
        """The `tandem worker` children of this serve process."""
        children = psutil.Process(self.proc.pid).children(recursive=True)
        return [p for p in children if "worker" in p.cmdline()]

    def stop(self, timeout: float = 60.0) -> int:
        """SIGINT (as Ctrl-C), wait; SIGKILL the whole tree if it does not exit in time."""
        if self.proc.poll() is None:
            children: list[psutil.Process] = []
            with contextlib.suppress(psutil.Error):
                children = psutil.Process(self.proc.pid).children(recursive=True)
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                for child in children:
                    with contextlib.suppress(psutil.Error):
                        child.kill()
        self._reader.join(10)
        return self.proc.returncode

    def kill_group(self) -> None:
        """SIGKILL whatever is left in a ``new_session`` server's process group (after `stop`:
        a process that outlived its parent, such as the engine core of a killed vLLM worker)."""
        if self.new_session:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
