"""Kernel tests run the Triton kernels on CPU tensors through the interpreter when no GPU exists.

TRITON_INTERPRET must be set before ``triton.jit`` builds the kernels, i.e. before
``triton_kernels`` is first imported, which is why it is set here at collection time.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
