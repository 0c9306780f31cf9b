"""Helpers that the tests and the benchmarks share (kept in the library so that neither imports
the other): tiny random models of every family and teacher-forced decoding."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

#: One tiny config per registered family: odd widths so nothing relies on powers of two.
TINY_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
                 "phi3", "olmo", "olmo2")
TINY_VOCAB = 49152  # the built-in tokenizer's, so calibration text tokenizes into valid ids


def tiny_model(model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A 2-layer random model of ``model_type`` (hidden 72, FFN 100), in eval mode.

    Random init gives tiny activations; the projections are scaled by 4 so |act| spans decades
    like a trained model's and thresholds are meaningful.
    """
    import transformers
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    kwargs = dict(hidden_size=72, intermediate_size=100, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=18,
                  vocab_size=TINY_VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  max_position_embeddings=512, tie_word_embeddings=True)
    config = transformers.CONFIG_MAPPING[model_type](**kwargs)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "proj" in name:
                p.mul_(4.0)
    return model


@torch.no_grad()
def teacher_forced_logits(model: nn.Module, ids: torch.Tensor, tokens: torch.Tensor,
                          before_step: Callable[[int], None] | None = None) -> torch.Tensor:
    """Logits [steps, B, V] (fp32) of feeding ``tokens`` [B, steps] one at a time after ``ids``
    [B, P] (a decode step each); ``before_step(t)`` is called before decode step t."""
    from transformers import DynamicCache

    from sparseffn.generation import cache_kwarg

    cache = {cache_kwarg(model): DynamicCache(config=model.config)}
    model(input_ids=ids, use_cache=True, **cache)
    out = []
    for t in range(tokens.shape[1]):
        if before_step is not None:
            before_step(t)
        step = model(input_ids=tokens[:, t:t + 1], use_cache=True, **cache)
        out.append(step.logits[:, -1].float())
    return torch.stack(out)
