#!/usr/bin/env bash
# The demo: calibrate the built-in SmolLM2-135M and compare dense with sparse (a few minutes on CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec "${PYTHON:-python3}" -m sparseffn.cli demo "$@"
