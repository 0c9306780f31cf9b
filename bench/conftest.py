"""The benchmarks' own tests (``pytest bench``): the repository root importable (``bench`` is not
an installed package), and the Triton kernels run on CPU tensors through the interpreter where
there is no GPU. TRITON_INTERPRET must be set before anything imports ``triton_kernels``."""
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist each worker takes one torch thread: two workers on two cores, instead of
# four threads fighting over them. (Tests of the CPU ops' threaded path set their own count.)
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
