"""vLLM's engine core dies with the Tandem worker that started it, SIGKILL included.

Without this, a killed worker leaves its engine core (and the engine core's own workers) running,
holding the KV cache and, on a GPU, the GPU's memory. The kernel does the work: a process that
sets ``PR_SET_PDEATHSIG`` gets that signal when its parent dies. vLLM starts its engine core in
one of two ways, and both are covered:

* **spawn** (vLLM's CPU build always; CUDA once initialized): the engine core is a fresh
  interpreter that loads vLLM's *general plugins*; Tandem registers `die_with_tandem_worker` as
  one (entry point ``vllm.general_plugins``), which acts only in a direct child of the worker
  named by ``TANDEM_VLLM_WORKER_PID``;
* **fork**: an ``os.register_at_fork`` hook does the same in the forked child.

The engine core's own workers are not the Tandem worker's children: vLLM ends them itself when
the engine core goes. Linux only (elsewhere this does nothing).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

import psutil

WORKER_PID_ENV = "TANDEM_VLLM_WORKER_PID"
_PR_SET_PDEATHSIG = 1
_registered = False


def watch_this_process() -> None:
    """Called in the Tandem worker before vLLM starts its engine core."""
    global _registered
    if _registered or not sys.platform.startswith("linux"):
        return
    _registered = True
    os.environ[WORKER_PID_ENV] = str(os.getpid())
    os.register_at_fork(after_in_child=die_with_tandem_worker)


def die_with_tandem_worker() -> None:
    """vLLM general plugin (and at-fork hook): in a direct child of the Tandem worker, ask for
    SIGTERM when that worker dies (vLLM's engine core shuts down cleanly on SIGTERM)."""
    worker = os.environ.get(WORKER_PID_ENV)
    if not worker or not sys.platform.startswith("linux") or int(worker) == os.getpid():
        return  # not under a Tandem worker, or the worker itself
    if not psutil.pid_exists(int(worker)):
        os._exit(1)  # the worker that started this process died while it was starting
    if os.getppid() != int(worker):
        return  # a grandchild: vLLM ends it when its own parent goes
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        return
    if os.getppid() != int(worker):  # the worker died before the prctl took effect
        os._exit(1)
