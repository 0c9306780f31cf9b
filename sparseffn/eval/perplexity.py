"""Perplexity over fixed token windows: whole windows at once, or as decode steps after a
prompt."""
from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm

from sparseffn.modules import start_sequences


def _nll(logits: torch.Tensor, target: torch.Tensor) -> float:
    """Summed NLL of ``target`` [B, T] under ``logits`` [B, T, V], upcast to fp32."""
    logits = logits.float()
    return float(nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             target.reshape(-1), reduction="sum"))


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4,
               progress: bool = False, prompt_len: int = 0) -> float:
    """exp(mean next-token NLL) over ``windows`` [N, L] (each window scored on its own).

    Logits are upcast to fp32 before the log-softmax so fp16/bf16 models are scored fairly.

    ``prompt_len`` P > 0 scores windows as generation sees them: the first P tokens are the
    prompt (one forward, as ``generate``'s prefill, not scored), then tokens P..L-1 are fed one
    decode step at a time through the KV cache, each step scoring the next token. This is the
    perplexity of the decode steps, the only one that measures criteria that decide at the
    prompt (``coreinfer``); per-token criteria give the whole-window figure on those tokens.
    Sparsity counters see the decode steps only.
    """
    L = windows.shape[1]
    if not 0 <= prompt_len < L - 1:
        raise ValueError(f"prompt_len must be in [0, {L - 2}] for windows of {L} tokens, "
                         f"got {prompt_len}")
    device = model.get_input_embeddings().weight.device
    nll, count = 0.0, 0
    for batch in tqdm(windows.split(batch_size), desc="perplexity", disable=not progress):
        batch = batch.to(device)
        if prompt_len:
            nll += _decode_nll(model, batch, prompt_len)
            count += batch[:, prompt_len:].numel()
        else:
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1]
            nll += _nll(logits, batch[:, 1:])
            count += batch[:, 1:].numel()
    return math.exp(nll / count)


def _decode_nll(model: nn.Module, batch: torch.Tensor, prompt_len: int) -> float:
    """Summed NLL of tokens P..L-1 of ``batch`` [B, L], prefill then one token per step."""
    from transformers import DynamicCache

    from sparseffn.generation import cache_kwarg

    tracking = [(m, m.track) for m in model.modules() if hasattr(m, "track")]
    for m, _ in tracking:  # the prompt is not a decode step
        m.track = False
    start_sequences(model)
    cache = {cache_kwarg(model): DynamicCache(config=model.config)}
    try:
        out = model(input_ids=batch[:, :prompt_len], use_cache=True, logits_to_keep=1, **cache)
    finally:
        for m, track in tracking:
            m.track = track
    nll = _nll(out.logits[:, -1:], batch[:, prompt_len:prompt_len + 1])
    for t in range(prompt_len, batch.shape[1] - 1):
        out = model(input_ids=batch[:, t:t + 1], use_cache=True, **cache)
        nll += _nll(out.logits[:, -1:], batch[:, t + 1:t + 2])
    return nll
