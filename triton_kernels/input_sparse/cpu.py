"""The CPU decode path of the input-sparse GEMV: reads only the active rows of ``w_t``.

``F.embedding_bag`` over the rows of the input-major weight, weighted by the active inputs, is a
fused gather-and-sum: y[b] = sum over active k of x[b, k] * w_t[k], without materialising the
gathered rows. Same semantics as ``reference`` (strict ``|x| > threshold`` in fp32, or a mask);
unchecked (the sparse modules call it with shapes they built) and meant for the dtypes
``sparseffn.dispatch`` measured it on.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def input_sparse_gemv_cpu(x: torch.Tensor, w_t: torch.Tensor,
                          threshold: Optional[torch.Tensor] = None,
                          mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [B, K], w_t [K, N] (rows contiguous) -> y [B, N] in x's dtype."""
    if x.shape[0] == 1:  # the decode step of one sequence: as few small ops as possible
        x0 = x[0]
        # fp32 comparison, as the reference: a 0-dim threshold would round to x's dtype.
        active = x0.float().abs() > threshold.float() if threshold is not None \
            else mask.expand_as(x)[0]
        k = active.nonzero().squeeze(1)
        y = F.embedding_bag(k.unsqueeze(0), w_t, mode="sum",
                            per_sample_weights=x0.index_select(0, k).unsqueeze(0))
        return y if y.dtype == x.dtype else y.to(x.dtype)
    if threshold is not None:
        active = x.float().abs() > threshold.float()
    else:
        active = mask.expand_as(x)
    seq, k = active.nonzero(as_tuple=True)
    counts = active.sum(dim=1)
    offsets = torch.zeros_like(counts)
    offsets[1:] = counts.cumsum(0)[:-1]
    y = F.embedding_bag(k, w_t, offsets, mode="sum",
                        per_sample_weights=x[seq, k].to(w_t.dtype))
    return y.to(x.dtype)


def input_sparse_gemv_grouped_cpu(x: torch.Tensor, w_ts: Sequence[torch.Tensor],
                                  thresholds: Sequence[torch.Tensor]) -> torch.Tensor:
    """x [B, K], one w_t [K, N_g] and threshold per weight -> [B, sum N_g]."""
    return torch.cat([input_sparse_gemv_cpu(x, w, t) for w, t in zip(w_ts, thresholds)], dim=-1)
