"""Input-sparse GEMV ops: y = W x over the inputs that are active, skipping the weights of the
rest (semantics in ``reference``).

Used for the down projection and the attention/MLP inputs under TEAL-style criteria. The weight
W [N, K] is stored transposed once, ``w_t = W.t().contiguous()`` [K, N], so that each inactive
input k is one contiguous row of ``w_t`` that the kernel never loads. A row of ``w_t`` is loaded
once if any sequence of the launch needs it.

``input_sparse_gemv_grouped(x, [w_t1, w_t2, ...], [t1, t2, ...])`` computes up to three such
products on one x in one launch (q/k/v, gate/up), each with its own threshold, and returns their
outputs side by side, [B, N1 + N2 + ...]: the fixed cost of a call (launch, compaction prologue,
finishing the split-K sums) is paid once for the group instead of per weight.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import common as C
from ..tuning import LaunchConfig, tuned_config
from .reference import (input_sparse_gemv_grouped_ref, input_sparse_gemv_ref, validate,
                        validate_counts, validate_grouped)


@C.on_input_device
def triton_impl(x: torch.Tensor, w_t: torch.Tensor, threshold: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None,
                config: Optional[LaunchConfig] = None,
                out: Optional[torch.Tensor] = None,
                counts: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Run the Triton kernel (CUDA, or CPU tensors under TRITON_INTERPRET=1).

    ``config`` forces a launch config (tests); by default it is tuned once per shape. ``out``
    ([B, N] contiguous, x's dtype) receives y, e.g. a NaN-filled buffer in tests. ``counts``
    (int64 [2]) += [active entries, B * K], counted by the kernel.
    """
    B, K, N = validate(x, w_t, threshold, mask)
    validate_counts(None if counts is None else [counts], 1, x.device)
    C.require_kernels(x.device)
    from .kernel import MODE_MASK, MODE_THRESHOLD

    if threshold is not None:
        mode, thrs, m = MODE_THRESHOLD, [C.expand_threshold(threshold, B, K, x.device, "")], None
    else:
        mode, thrs, m = MODE_MASK, None, C.expand_mask(mask, B, K, x.device, "")
    y = C.output_buffer(out, (B, N), x.dtype, x.device)
    _launch_chunks(x, [w_t], mode, thrs, m, y, config, None if counts is None else [counts])
    return y


def _launch_chunks(x: torch.Tensor, w_ts: list[torch.Tensor], mode: int,
                   thrs: Optional[list[torch.Tensor]], mask: Optional[torch.Tensor],
                   y: torch.Tensor, config: Optional[LaunchConfig],
                   counts: Optional[list[torch.Tensor]] = None) -> None:
    """One launch per MAX_BATCH_PER_LAUNCH sequences (thresholds / mask already [B, K] views)."""
    from .kernel import launch_input_sparse

    step = C.MAX_BATCH_PER_LAUNCH
    for b0 in range(0, x.shape[0], step):
        sl = slice(b0, min(x.shape[0], b0 + step))
        cfg = config or pick_config(w_ts, sl.stop - sl.start)
        launch_input_sparse(x[sl], w_ts, mode, None if thrs is None else [t[sl] for t in thrs],
                            None if mask is None else mask[sl], y[sl], cfg, counts)


def pick_config(w_t: torch.Tensor | Sequence[torch.Tensor], batch: int) -> LaunchConfig:
    """Launch config for this weight (or group of weights) and batch, tuned once per (batch, K,
    widths, dtype, device)."""
    from . import kernel as kern

    w_ts = [w_t] if isinstance(w_t, torch.Tensor) else list(w_t)
    K = w_ts[0].shape[0]
    widths = tuple(w.shape[1] for w in w_ts)
    N = sum(widths)
    dev, dtype = w_ts[0].device, w_ts[0].dtype
    key = ("input_sparse", batch, K, widths, dtype, str(dev))

    def make_bench(sparsity: float):
        x = torch.randn(batch, K, device=dev, dtype=dtype)
        m = C.row_pattern(K, sparsity, dev).expand(batch, K)
        out = torch.empty(batch, N, device=dev, dtype=dtype)
        return lambda cfg: kern.launch_input_sparse(x, w_ts, kern.MODE_MASK, None, m, out, cfg)

    cands = kern.candidates(batch, K, N, C.sm_count(dev))
    return tuned_config(key, cands, make_bench, dev)


@torch.library.custom_op("sparseffn::input_sparse_gemv", mutates_args=())
def input_sparse_gemv(x: torch.Tensor, w_t: torch.Tensor,
                      threshold: Optional[torch.Tensor] = None,
                      mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y [B, N] = sum over active k of x[b, k] * w_t[k, :] (see module docstring).

    Give exactly one of ``threshold`` (float32, broadcastable to [B, K]; active = |x| > threshold)
    and ``mask`` (bool, broadcastable to [B, K]). CUDA tensors (and CPU tensors under
    TRITON_INTERPRET=1) run the Triton kernel, others the reference.
    """
    if C.kernels_available(x.device):  # CUDA, or CPU tensors under TRITON_INTERPRET=1
        return triton_impl(x, w_t, threshold, mask)
    return input_sparse_gemv_ref(x, w_t, threshold, mask)


@input_sparse_gemv.register_fake
def _(x: torch.Tensor, w_t: torch.Tensor, threshold: Optional[torch.Tensor] = None,
      mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    B, _, N = validate(x, w_t, threshold, mask)
    return x.new_empty((B, N))


# The counting forms are separate ops with a required ``counts``: inductor cannot lower a
# mutated argument that may be None.
@torch.library.custom_op("sparseffn::input_sparse_gemv_counted", mutates_args=("counts",))
def input_sparse_gemv_counted(x: torch.Tensor, w_t: torch.Tensor, counts: torch.Tensor,
                              threshold: Optional[torch.Tensor] = None,
                              mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``input_sparse_gemv`` that also adds [active (b, k) entries, B * K] to ``counts``
    (int64 [2] on x's device, a site's measured-sparsity counter), in the kernel."""
    if C.kernels_available(x.device):
        return triton_impl(x, w_t, threshold, mask, counts=counts)
    return input_sparse_gemv_ref(x, w_t, threshold, mask, counts)


@input_sparse_gemv_counted.register_fake
def _(x: torch.Tensor, w_t: torch.Tensor, counts: torch.Tensor,
      threshold: Optional[torch.Tensor] = None,
      mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    B, _, N = validate(x, w_t, threshold, mask)
    validate_counts([counts], 1, x.device)
    return x.new_empty((B, N))


@C.on_input_device
def grouped_triton_impl(x: torch.Tensor, w_ts: Sequence[torch.Tensor],
                        thresholds: Sequence[torch.Tensor],
                        config: Optional[LaunchConfig] = None,
                        out: Optional[torch.Tensor] = None,
                        counts: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
    """The grouped op's Triton path (CUDA, or CPU tensors under TRITON_INTERPRET=1)."""
    B, K, widths = validate_grouped(x, w_ts, thresholds)
    validate_counts(counts, len(w_ts), x.device)
    C.require_kernels(x.device)
    from .kernel import MODE_THRESHOLD

    thrs = [C.expand_threshold(t, B, K, x.device, "") for t in thresholds]
    y = C.output_buffer(out, (B, sum(widths)), x.dtype, x.device)
    _launch_chunks(x, list(w_ts), MODE_THRESHOLD, thrs, None, y, config,
                   None if counts is None else list(counts))
    return y


@torch.library.custom_op("sparseffn::input_sparse_gemv_grouped", mutates_args=())
def input_sparse_gemv_grouped(x: torch.Tensor, w_ts: list[torch.Tensor],
                              thresholds: list[torch.Tensor]) -> torch.Tensor:
    """[B, sum N_g]: ``input_sparse_gemv(x, w_ts[g], thresholds[g])`` for every g, side by side,
    in one launch (see module docstring). Up to three weights, all [K, N_g] of x's dtype.
    """
    if C.kernels_available(x.device):  # CUDA, or CPU tensors under TRITON_INTERPRET=1
        return grouped_triton_impl(x, w_ts, thresholds)
    return input_sparse_gemv_grouped_ref(x, w_ts, thresholds)


@input_sparse_gemv_grouped.register_fake
def _(x: torch.Tensor, w_ts: list[torch.Tensor],
      thresholds: list[torch.Tensor]) -> torch.Tensor:
    B, _, widths = validate_grouped(x, w_ts, thresholds)
    return x.new_empty((B, sum(widths)))


@torch.library.custom_op("sparseffn::input_sparse_gemv_grouped_counted",
                         mutates_args=("counts",))
def input_sparse_gemv_grouped_counted(x: torch.Tensor, w_ts: list[torch.Tensor],
                                      thresholds: list[torch.Tensor],
                                      counts: list[torch.Tensor]) -> torch.Tensor:
    """``input_sparse_gemv_grouped`` that also adds each weight's [active entries, B * K] to
    its ``counts[g]`` (int64 [2]), in the kernel."""
    if C.kernels_available(x.device):
        return grouped_triton_impl(x, w_ts, thresholds, counts=counts)
    return input_sparse_gemv_grouped_ref(x, w_ts, thresholds, counts)


@input_sparse_gemv_grouped_counted.register_fake
def _(x: torch.Tensor, w_ts: list[torch.Tensor], thresholds: list[torch.Tensor],
      counts: list[torch.Tensor]) -> torch.Tensor:
    B, _, widths = validate_grouped(x, w_ts, thresholds)
    validate_counts(counts, len(w_ts), x.device)
    return x.new_empty((B, sum(widths)))
