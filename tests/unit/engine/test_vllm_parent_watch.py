"""parent_watch: a process Tandem's vLLM worker started dies with that worker, SIGKILL included."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import textwrap

import psutil
import pytest
from tests.support import poll_until

from tandem.engine.vllm import parent_watch

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")

# The "worker": names itself in the environment, then starts a "spawned engine core" that runs
# the plugin the way vLLM's general-plugin loader would, and a grandchild that must be left alone.
WORKER = textwrap.dedent(
    """
    import os, subprocess, sys, time
    os.environ["TANDEM_VLLM_WORKER_PID"] = str(os.getpid())
    core = subprocess.Popen([sys.executable, "-c",
            "from tandem.engine.vllm.parent_watch import die_with_tandem_worker as f; f(); "
        "print('armed', flush=True); import time; time.sleep(60)"])
    print(core.pid, flush=True)
    time.sleep(60)
    """
)


def test_the_engine_core_gets_sigterm_when_the_worker_is_killed():
    worker = subprocess.Popen([sys.executable, "-c", WORKER], stdout=subprocess.PIPE, text=True)
    assert worker.stdout is not None
    core = psutil.Process(int(worker.stdout.readline()))
    try:
        assert worker.stdout.readline().strip() == "armed"  # the plugin ran in the core (it shares the pipe)
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        poll_until(lambda: not core.is_running() or core.status() == psutil.STATUS_ZOMBIE, timeout=5, what="its exit")
    finally:
        if core.is_running():
            core.kill()


def test_a_core_whose_worker_is_already_gone_exits():
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    env = {**os.environ, parent_watch.WORKER_PID_ENV: gone.stdout.strip()}
    code = "from tandem.engine.vllm.parent_watch import die_with_tandem_worker as f; f(); print('survived')"
    core = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30)
    assert core.returncode == 1 and "survived" not in core.stdout


def test_outside_a_tandem_worker_the_plugin_does_nothing(monkeypatch):
    before = _parent_death_signal()
    monkeypatch.delenv(parent_watch.WORKER_PID_ENV, raising=False)
    parent_watch.die_with_tandem_worker()  # no worker named: returns without touching this process
    assert _parent_death_signal() == before
    monkeypatch.setenv(parent_watch.WORKER_PID_ENV, str(os.getpid()))
    parent_watch.die_with_tandem_worker()  # the worker itself: nothing either
    assert _parent_death_signal() == before


def _parent_death_signal() -> int:
    """This process's PR_SET_PDEATHSIG setting (0: none), read back with PR_GET_PDEATHSIG."""
    value = ctypes.c_int(-1)
    assert ctypes.CDLL("libc.so.6", use_errno=True).prctl(2, ctypes.byref(value)) == 0  # PR_GET_PDEATHSIG
    return value.value
