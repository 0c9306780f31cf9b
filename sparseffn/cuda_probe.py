"""Where the CUDA kernel path pays at batch > 1: measured once per product, batch and sparsity.

At batch B the input-sparse kernels read the union of the sequences' active rows. With
per-token sets that union is most rows at B >= 4, and a kernel reading nearly every row for B
sequences is slower than cuBLAS (docs/kernels.md, "Batch sizes"); at B = 2 and 50% some
products win (one grouped q/k/v launch against three ``F.linear`` calls) and others lose. So
under ``kernel_mode="auto"`` a module takes the kernel path at batch B > 1 only where its
decode products, timed here at B, are no slower than the dense products they replace.

A product is one launch of the input-sparse GEMV: a weight, or a group of weights read with one
input (q/k/v, gate/up), each with its site's calibrated per-token sparsity s. It is timed on
normal random inputs with the per-token threshold at the s-quantile of |x|, so each sequence
keeps its own random set and the union keeps 1 - s^B of the rows. Real activations share their
large channels across tokens, so their union is no larger on average: the estimate errs toward
dense. The dense side is ``F.linear`` on the same (input-major) weights, which is what the
reference path runs at that batch. Both are timed as CUDA-graph replays with L2 flushed
(``triton_kernels.tuning.time_on_device``); the kernel is tuned for B first, as the decode
step will be. Results are cached per (shapes, dtype, device, B, s rounded to 0.05), so the
layers of a model share a handful of measurements.
"""
from __future__ import annotations

import logging
import math
from typing import Sequence

import torch
import torch.nn.functional as F

from triton_kernels.tuning import time_on_device

log = logging.getLogger("sparseffn")

#: Sparsities are rounded to this step for the cache key.
_STEP = 0.05

#: One product: the weights [N_g, K] read with one input (input-major layout), and the
#: per-token sparsity of each one's site.
Product = tuple[Sequence[torch.Tensor], Sequence[float]]

_TIMES: dict[tuple, tuple[float, float]] = {}
_ANNOUNCED: set[int] = set()


def _quantile_abs_normal(s: float) -> float:
    """t with P(|x| <= t) = s for x ~ N(0, 1)."""
    s = min(max(s, 0.0), 1.0 - 1e-6)
    return math.sqrt(2.0) * torch.erfinv(torch.tensor(s, dtype=torch.float64)).item()


def product_times(weights: Sequence[torch.Tensor], sparsities: Sequence[float],
                  batch: int) -> tuple[float, float]:
    """(ms of the input-sparse launch over ``weights`` at ``batch`` random sequences with
    per-token ``sparsities``, ms of ``F.linear`` on each weight) for CUDA weights [N_g, K]
    stored input-major (``weight.t()`` contiguous)."""
    w0 = weights[0]
    rounded = [round(s / _STEP) * _STEP for s in sparsities]
    key = (tuple(tuple(w.shape) for w in weights), w0.dtype, str(w0.device), batch,
           tuple(rounded))
    if key not in _TIMES:
        _TIMES[key] = _measure(weights, rounded, batch)
    return _TIMES[key]


def _measure(weights: Sequence[torch.Tensor], sparsities: Sequence[float],
             batch: int) -> tuple[float, float]:
    if batch not in _ANNOUNCED:
        _ANNOUNCED.add(batch)
        log.info("sparseffn: timing the kernel path against dense at batch %d (once per "
                 "product shape and sparsity, a few seconds)", batch)
    w0 = weights[0]
    g = torch.Generator(device=w0.device).manual_seed(0)
    x = torch.randn(batch, w0.shape[1], generator=g, device=w0.device).to(w0.dtype)
    thresholds = [torch.tensor(_quantile_abs_normal(s), device=w0.device) for s in sparsities]
    w_ts = [w.t() for w in weights]
    if len(weights) == 1:
        def sparse() -> None:
            torch.ops.sparseffn.input_sparse_gemv(x, w_ts[0], threshold=thresholds[0])
    else:
        def sparse() -> None:
            torch.ops.sparseffn.input_sparse_gemv_grouped(x, w_ts, thresholds)

    def dense() -> None:
        for w in weights:
            F.linear(x, w)
    with torch.no_grad(), torch.cuda.device(w0.device):
        return time_on_device(sparse), time_on_device(dense)


def pays(products: Sequence[Product], batch: int) -> bool:
    """Whether these products, run by the kernels at ``batch`` sequences, take no longer in
    all than the dense products (False for no products: such a plan is not probed)."""
    if not products:
        return False
    sparse = dense = 0.0
    for weights, sparsities in products:
        s, d = product_times(weights, sparsities, batch)
        sparse, dense = sparse + s, dense + d
    log.debug("sparseffn: batch %d kernel path %.1f us against dense %.1f us", batch,
              1e3 * sparse, 1e3 * dense)
    return sparse <= dense
