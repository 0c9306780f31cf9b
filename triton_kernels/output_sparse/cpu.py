"""The CPU decode path of the output-sparse GEMV: reads only the rows some sequence needs.

The union of the active rows of ``w`` is gathered (``index_select``) and multiplied by x; each
sequence keeps its own active outputs, exact zeros elsewhere (``reference``'s semantics).
Unchecked; see ``sparseffn.dispatch`` for where it is used.
"""
from __future__ import annotations

import torch


def output_sparse_gemv_cpu(x: torch.Tensor, w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x [B, K], w [N, K] (nn.Linear layout), mask bool [B, N] -> y [B, N] in x's dtype."""
    mask = mask.expand(x.shape[0], w.shape[0])
    rows = mask.any(dim=0).nonzero().squeeze(1)
    y = x.new_zeros(x.shape[0], w.shape[0])
    y[:, rows] = x @ w.index_select(0, rows).t()
    return torch.where(mask, y, 0)
