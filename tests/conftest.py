"""Shared fixtures: tiny random-weight models of every family, and the real built-in model."""
from __future__ import annotations

import os

import pytest
import torch

# Kernel tests run Triton on the CPU through its interpreter; the variable must be set before
# anything imports triton_kernels (the core may), hence here, first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist each worker takes one torch thread: two workers on two cores, instead of
# four threads fighting over them. (Tests of the CPU ops' threaded path set their own count.)
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
from transformers import AutoTokenizer

from sparseffn.models import builtin_model_path
from sparseffn.testing import TINY_FAMILIES, tiny_model  # noqa: F401 - the tests' imports


@pytest.fixture(scope="session")
def tokenizer():
    return AutoTokenizer.from_pretrained(builtin_model_path())


@pytest.fixture(scope="session")
def texts():
    """Calibration documents (pydoc topics: always available offline)."""
    from sparseffn.data import load_texts
    return load_texts("pydoc", "calibration")


@pytest.fixture(scope="session")
def eval_ids(tokenizer):
    from sparseffn.data import load_texts, token_windows
    return token_windows(tokenizer, load_texts("pydoc", "eval"), 512, 128, "eval")


@pytest.fixture(scope="session")
def builtin():
    from sparseffn.models import load_builtin_model
    return load_builtin_model()
