"""Input-sparse GEMV: validation and the plain-PyTorch reference (the CPU path).

Semantics (``torch.ops.sparseffn.input_sparse_gemv``)::

    active[b, k] = |x[b, k]| > threshold[b, k]      (strict; or active = mask[b, k])
    y[b, :]      = sum over active k of x[b, k] * w_t[k, :]

x [B, K] (any strides), w_t [K, N] (unit stride along N), threshold float32 broadcastable to
[B, K] ([] global, [K] per channel, [B, 1] per token), mask bool broadcastable to [B, K];
y [B, N] contiguous in x's dtype, accumulated in fp32. The grouped form takes up to
``MAX_GROUPS`` weights [K, N_g] sharing x, each with its own threshold, and returns their
outputs side by side, [B, N1 + N2 + ...].
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import common as C

#: Most weights one grouped call takes (q/k/v, or gate/up).
MAX_GROUPS = 3


def validate(x: torch.Tensor, w_t: torch.Tensor, threshold: Optional[torch.Tensor],
             mask: Optional[torch.Tensor]) -> tuple[int, int, int]:
    """(B, K, N) of a valid call, or a ValueError naming the fix."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError("x must be a 2-D tensor [B, K]")
    C.check_float_dtype("x", x)
    B, K = x.shape
    if w_t.dim() != 2 or w_t.shape[0] != K:
        raise ValueError(f"w_t must be [K, N] = the weight [N, K] transposed, with K={K} "
                         f"matching x; got {list(w_t.shape)}")
    N = w_t.shape[1]
    C.check_matrix("w_t", w_t, K, N, x.dtype, x.device, contiguous_rows=True)
    C.exactly_one(threshold, mask)
    if threshold is not None:
        C.expand_threshold(threshold, B, K, x.device, "[B, K] of x")
    else:
        C.expand_mask(mask, B, K, x.device, "[B, K] of x")
    return B, K, N


def validate_grouped(x: torch.Tensor, w_ts: Sequence[torch.Tensor],
                     thresholds: Sequence[torch.Tensor]) -> tuple[int, int, list[int]]:
    """(B, K, [N_g]) of a valid grouped call, or a ValueError."""
    if not 1 <= len(w_ts) <= MAX_GROUPS:
        raise ValueError(f"input_sparse_gemv_grouped takes 1 to {MAX_GROUPS} weights, "
                         f"got {len(w_ts)}")
    if len(thresholds) != len(w_ts):
        raise ValueError(f"one threshold per weight: {len(w_ts)} weights, "
                         f"{len(thresholds)} thresholds")
    widths = []
    for w_t, t in zip(w_ts, thresholds):
        B, K, N = validate(x, w_t, t, None)
        widths.append(N)
    return B, K, widths


def validate_counts(counts: Optional[Sequence[torch.Tensor]], groups: int,
                    device: torch.device) -> None:
    """None, or one int64 [2] tensor per weight on ``device`` (else a ValueError)."""
    if counts is None:
        return
    if len(counts) != groups:
        raise ValueError(f"one counts tensor per weight: {groups} weights, {len(counts)} counts")
    for c in counts:
        if c.dtype != torch.int64 or c.shape != (2,) or c.device != device \
                or not c.is_contiguous():
            raise ValueError(f"counts must be contiguous int64 [2] tensors on {device} "
                             f"([active, total], a site's SiteCounter.counts); got {c.dtype} "
                             f"{list(c.shape)} on {c.device}")


def add_counts(counts: Optional[torch.Tensor], active: torch.Tensor) -> None:
    """counts [2] int64 += [active entries, all entries] of the bool ``active``."""
    if counts is not None:
        counts[0] += active.sum()
        counts[1] += active.numel()


def _active(x: torch.Tensor, threshold: Optional[torch.Tensor],
            mask: Optional[torch.Tensor]) -> torch.Tensor:
    if threshold is not None:
        return x.float().abs() > threshold.float()
    return mask.expand_as(x)


def input_sparse_gemv_ref(x: torch.Tensor, w_t: torch.Tensor,
                          threshold: Optional[torch.Tensor] = None,
                          mask: Optional[torch.Tensor] = None,
                          counts: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Plain-PyTorch reference (and the CPU implementation): fp32 math, output in x's dtype.

    x [B, K], w_t [K, N] -> y [B, N]; ``counts`` (int64 [2]) += [active entries, B * K].
    """
    validate(x, w_t, threshold, mask)
    validate_counts(None if counts is None else [counts], 1, x.device)
    active = _active(x, threshold, mask)
    add_counts(counts, active)
    xa = torch.where(active, x.float(), 0.0)
    return (xa @ w_t.float()).to(x.dtype)


def input_sparse_gemv_grouped_ref(x: torch.Tensor, w_ts: Sequence[torch.Tensor],
                                  thresholds: Sequence[torch.Tensor],
                                  counts: Optional[Sequence[torch.Tensor]] = None
                                  ) -> torch.Tensor:
    """Reference of the grouped op: x [B, K], w_ts [K, N_g] -> [B, sum N_g]; ``counts``: one
    int64 [2] per weight, as in ``input_sparse_gemv_ref``."""
    validate_grouped(x, w_ts, thresholds)
    validate_counts(counts, len(w_ts), x.device)
    cs = list(counts) if counts is not None else [None] * len(w_ts)
    return torch.cat([input_sparse_gemv_ref(x, w, t, counts=c)
                      for w, t, c in zip(w_ts, thresholds, cs)], 1)
