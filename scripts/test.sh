#!/usr/bin/env bash
# The whole test suite (kernels run on the CPU under TRITON_INTERPRET=1 when there is no GPU).
# Tests run in one worker process per core (pytest-xdist; at most 4, SPARSEFFN_TEST_WORKERS
# overrides): most of their time is single-threaded Python (the Triton interpreter, small
# models), so two workers on two cores take about half the time of one.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
PY=${PYTHON:-python3}
workers=${SPARSEFFN_TEST_WORKERS:-$("$PY" -c "import os; print(min(4, os.cpu_count() or 1))")}
exec "$PY" -m pytest tests -n "$workers" "$@"
