#!/usr/bin/env bash
# Static checks: ruff lint, ruff format check, mypy (strict for engine/ and store/); zero findings.
set -euo pipefail
cd "$(dirname "$0")/.."
ruff check platform
ruff format --check platform
mypy
