"""Kernel tests run the Triton kernels on CPU tensors through the interpreter when no GPU exists.

TRITON_INTERPRET must be set before ``triton.jit`` builds the kernels, i.e. before
``triton_kernels`` is first imported, which is why it is set here at collection time. If
something imported ``triton_kernels`` earlier (a root conftest importing the core package), the
kernels were built for a GPU and every CPU kernel test would be skipped: fail loudly instead.
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    early = sys.modules.get("triton_kernels")
    if early is not None and not early.INTERPRET and os.environ["TRITON_INTERPRET"] == "1":
        raise RuntimeError(
            "triton_kernels was imported before TRITON_INTERPRET=1 was set, so its kernels "
            "cannot run on the CPU: set it in tests/conftest.py (before anything imports "
            "triton_kernels) or in the environment")
