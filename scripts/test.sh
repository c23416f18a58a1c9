#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite: the fast unit tier, then the end-to-end tier
# on the real SmolLM2-135M-Instruct model (pulled into the model cache on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PYTHONPATH=src .venv/bin/lint-imports  # the layer rules of docs/architecture.md
.venv/bin/ruff check src tests benchmarks
.venv/bin/ruff format --check src tests benchmarks
.venv/bin/python -m pytest -q -m "not e2e" tests "$@"
.venv/bin/python -m pytest -q -m e2e tests "$@"
