"""Real model shapes with random weights, and the bytes a decode step must read.

Random weights keep the benchmark offline and the shapes exact; the calibration code still
runs for real (on random token ids), so the thresholds hit the target sparsity on the
activations this model produces. Speed depends on the bytes read, not on what the weights mean.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# config kwargs per shape (transformers model_type first)
SHAPES: dict[str, dict] = {
    "llama3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       vocab_size=32000, rope_theta=1000000.0, max_position_embeddings=8192,
                       sliding_window=None),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       vocab_size=152064, rope_theta=1000000.0, max_position_embeddings=8192),
    # CPU smoke runs and tests of the benchmark itself
    "tiny-llama": dict(model_type="llama", hidden_size=96, intermediate_size=260,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       vocab_size=1000, max_position_embeddings=2048),
}


def build_model(shape: str, dtype: torch.dtype, device: str, layers: int | None = None,
                seed: int = 0) -> nn.Module:
    """A causal LM of ``shape`` with random N(0, 0.02) weights, built directly on ``device``."""
    import transformers
    from transformers import AutoModelForCausalLM

    if shape not in SHAPES:
        raise SystemExit(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
    kwargs = dict(SHAPES[shape])
    model_type = kwargs.pop("model_type")
    if layers:
        kwargs["num_hidden_layers"] = layers
    config = transformers.CONFIG_MAPPING[model_type](**kwargs, tie_word_embeddings=False,
                                                     eos_token_id=None, pad_token_id=0)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = None  # decode exactly the requested tokens
    model.generation_config.pad_token_id = 0
    return model.eval().requires_grad_(False)


@dataclass
class StepBytes:
    """Bytes one decode step reads (weights, KV cache), for the bandwidth floor."""

    weights: float
    kv_cache: float

    @property
    def total(self) -> float:
        return self.weights + self.kv_cache


def step_bytes(model: nn.Module, batch: int, cache_len: int,
               skipped_fraction_of_projections: float = 0.0) -> StepBytes:
    """Bytes of a decode step: every weight once, less the skipped share of the decoder
    layers' projection weights, plus the K and V of ``cache_len`` positions per sequence
    (a static cache attends over its whole length)."""
    from sparseffn.families import decoder_layers

    elt = next(model.parameters()).element_size()
    total = sum(p.numel() for p in model.parameters()) * elt
    embed = model.get_input_embeddings().weight
    total -= embed.numel() * elt - batch * embed.shape[1] * elt  # one embedding row per token
    proj = sum(m.weight.numel() for layer in decoder_layers(model) for m in layer.modules()
               if isinstance(m, nn.Linear)) * elt
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * cache_len * elt
    return StepBytes(total - skipped_fraction_of_projections * proj, batch * kv)
