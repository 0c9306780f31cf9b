#!/usr/bin/env bash
# The whole test suite, the library's (tests/) and the benchmarks' own (bench/); kernels run on
# the CPU under TRITON_INTERPRET=1 when there is no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# Two workers (pytest-xdist), one torch thread each (tests/conftest.py): the Triton
# interpreter runs on one core, so two workers halve the kernel tests; the real-model tests
# keep both cores as before.
exec "${PYTHON:-python3}" -m pytest -n 2 tests bench "$@"
