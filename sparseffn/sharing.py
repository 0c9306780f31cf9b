"""Batch-shared sparsity: one set of active channels (or neurons) for all sequences of a batch.

At batch B every sequence has its own active set, and a decode step reads the union of them: at
B = 4 and 50% per-token sparsity that union is most rows (measured 0.94 of them for random
activations, docs/kernels.md), so batching erases what sparsity saves. With sharing, at each
position the batch keeps the ``keep`` channels of largest importance summed over its sequences,
``keep = width - round(sparsity * width)`` for the site's calibrated sparsity, and every
sequence uses that whole set: a step reads ``keep`` rows whatever the batch. (Also applying each
sequence's own threshold test inside the set would read no fewer rows at batch > 1, only drop
more of each sequence's inputs.)

Importance is the margin of the per-token test, ``|v| / threshold``: with one threshold per
layer (TEAL, CATS) that is ``|v|`` itself; with per-channel thresholds (WINA's column norms,
CHESS's per-neuron levels) it weighs each channel as the method does. Training-free: it uses the
calibration's thresholds and sparsities and nothing else.

Shared along dimension 0 of a module's input, so a teacher-forced forward over [B, T, ...]
shares at each of the T positions, as B sequences decoded in one batch would.
"""
from __future__ import annotations

import torch

from sparseffn.decode import largest

#: Stands in for a zero threshold (sparsity 0): every nonzero input then has an enormous
#: margin, and ``keep`` is the full width anyway.
_TINY = 1e-30


def keep_count(sparsity: float, width: int) -> int:
    """Channels a batch keeps at ``sparsity`` of ``width`` (at least one)."""
    return max(1, width - round(sparsity * width))


def shared_set(margin: torch.Tensor, keep: int) -> torch.Tensor:
    """margin [B, ..., C] -> bool [1, ..., C]: at each position, the ``keep`` channels of
    largest margin summed over the batch."""
    total = margin.float().sum(0, keepdim=True)
    if keep >= total.shape[-1]:
        return torch.ones_like(total, dtype=torch.bool)
    return largest(total, keep)


def shared_mask(magnitude: torch.Tensor, threshold: torch.Tensor, keep: int) -> torch.Tensor:
    """magnitude [B, ..., C] -> the batch's shared set, bool [1, ..., C] (broadcasts over the
    batch), chosen by the margins ``magnitude / threshold`` (threshold float32 [] or [C])."""
    return shared_set(magnitude.float() / threshold.float().clamp_min(_TINY), keep)
