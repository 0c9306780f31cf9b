"""Output-sparse GEMV: validation and the plain-PyTorch reference (the CPU path).

Semantics (``torch.ops.sparseffn.output_sparse_gemv``)::

    y[b, n] = w[n] . x[b]   if mask[b, n]   else exactly 0

x [B, K] (any strides), w [N, K] as ``nn.Linear.weight`` stores it (unit stride along K), mask
bool broadcastable to [B, N]; y [B, N] contiguous in x's dtype, fp32 accumulation.
"""
from __future__ import annotations

import torch

from .. import common as C


def validate(x: torch.Tensor, w: torch.Tensor, mask: torch.Tensor) -> tuple[int, int, int]:
    """(B, K, N) of a valid call, or a ValueError naming the fix."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError("x must be a 2-D tensor [B, K]")
    C.check_float_dtype("x", x)
    B, K = x.shape
    if w.dim() != 2 or w.shape[1] != K:
        raise ValueError(f"w must be [N, K] (nn.Linear layout) with K={K} matching x; "
                         f"got {list(w.shape)}")
    N = w.shape[0]
    C.check_matrix("w", w, N, K, x.dtype, x.device, contiguous_rows=True)
    C.expand_mask(mask, B, N, x.device, "[B, N] of the output")
    return B, K, N


def output_sparse_gemv_ref(x: torch.Tensor, w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch reference (and the CPU implementation). x [B, K], w [N, K] -> y [B, N]."""
    validate(x, w, mask)
    y = x.float() @ w.float().t()
    return torch.where(mask, y, 0.0).to(x.dtype)
