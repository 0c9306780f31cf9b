"""Shared fixtures: tiny random-weight models of every family, and the real built-in model."""
from __future__ import annotations

import os

import pytest
import torch

# Kernel tests run Triton on the CPU through its interpreter; the variable must be set before
# anything imports triton_kernels (the core may), hence here, first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from sparseffn.models import builtin_model_path

# One tiny config per registered family: odd widths so nothing relies on powers of two.
TINY_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
                 "phi3", "olmo", "olmo2")
VOCAB = 49152  # the built-in tokenizer's, so calibration text tokenizes into valid ids


def tiny_model(model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A 2-layer random model of ``model_type`` (hidden 72, FFN 100)."""
    torch.manual_seed(seed)
    kwargs = dict(hidden_size=72, intermediate_size=100, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=18, vocab_size=VOCAB,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=512,
                  tie_word_embeddings=True)
    config = transformers.CONFIG_MAPPING[model_type](**kwargs)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    # Random init gives tiny activations; scale the MLP weights so |act| spans decades like a
    # trained model's do and thresholds are meaningful.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "proj" in name:
                p.mul_(4.0)
    return model


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
