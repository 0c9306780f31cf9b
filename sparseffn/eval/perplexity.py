"""Perplexity over fixed token windows."""
from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4,
               progress: bool = False) -> float:
    """exp(mean next-token NLL) over ``windows`` [N, L] (each window scored on its own).

    Logits are upcast to fp32 before the log-softmax so fp16/bf16 models are scored fairly.
    """
    device = model.get_input_embeddings().weight.device
    nll, count = 0.0, 0
    for batch in tqdm(windows.split(batch_size), desc="perplexity", disable=not progress):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        target = batch[:, 1:]
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                           target.reshape(-1), reduction="sum")
        nll += float(loss)
        count += target.numel()
    return math.exp(nll / count)
