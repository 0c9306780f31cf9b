#!/usr/bin/env bash
# The whole test suite, the library's (tests/) and the benchmarks' own (bench/); kernels run on
# the CPU under TRITON_INTERPRET=1 when there is no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec "${PYTHON:-python3}" -m pytest tests bench "$@"
