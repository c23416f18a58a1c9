#!/usr/bin/env bash
# Set up (idempotent), check the code (layer contracts, lint, format, types) and run the whole test
# suite in three tiers: unit (in-process), integration (real etcd, NATS, subprocesses), then
# end-to-end on the real SmolLM2-135M-Instruct model (pulled into the model cache on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PYTHONPATH=src .venv/bin/lint-imports  # the layer rules of docs/architecture.md
.venv/bin/ruff check src tests benchmarks
.venv/bin/ruff format --check src tests benchmarks
.venv/bin/mypy  # strict, on src/tandem ([tool.mypy] in pyproject.toml)
.venv/bin/python -m pytest -q tests/unit "$@"
.venv/bin/python -m pytest -q tests/integration "$@"
.venv/bin/python -m pytest -q tests/e2e "$@"
