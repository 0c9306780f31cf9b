"""Input-sparse GEMV: y = W x over the inputs that are active, skipping the weights of the rest.

Used for the down projection and the attention/MLP inputs under TEAL-style criteria. The weight
W [N, K] is stored transposed once, ``w_t = W.t().contiguous()`` [K, N], so that each inactive
input k is one contiguous row of ``w_t`` that the kernel never loads.

Semantics (``torch.ops.sparseffn.input_sparse_gemv``)::

    active[b, k] = |x[b, k]| > threshold[b, k]      (strict; or active = mask[b, k])
    y[b, :]      = sum over active k of x[b, k] * w_t[k, :]

x [B, K] (any strides), w_t [K, N] (unit stride along N), threshold float32 broadcastable to
[B, K] ([] global, [K] per channel, [B, 1] per token), mask bool broadcastable to [B, K];
y [B, N] contiguous in x's dtype, accumulated in fp32. A row of ``w_t`` is loaded once if any
sequence of the launch needs it.

``input_sparse_gemv_grouped(x, [w_t1, w_t2, ...], [t1, t2, ...])`` computes up to three such
products on one x in one launch (q/k/v, gate/up), each with its own threshold, and returns their
outputs side by side, [B, N1 + N2 + ...]: the fixed cost of a call (launch, compaction prologue,
finishing the split-K sums) is paid once for the group instead of per weight.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import _common as C


def _validate(x: torch.Tensor, w_t: torch.Tensor, threshold: Optional[torch.Tensor],
              mask: Optional[torch.Tensor]) -> tuple[int, int, int]:
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


def _active(x: torch.Tensor, threshold: Optional[torch.Tensor],
            mask: Optional[torch.Tensor]) -> torch.Tensor:
    if threshold is not None:
        return x.float().abs() > threshold.float()
    return mask.expand_as(x)


def input_sparse_gemv_ref(x: torch.Tensor, w_t: torch.Tensor,
                          threshold: Optional[torch.Tensor] = None,
                          mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Plain-PyTorch reference (and the CPU implementation): fp32 math, output in x's dtype.

    x [B, K], w_t [K, N] -> y [B, N].
    """
    _validate(x, w_t, threshold, mask)
    xa = torch.where(_active(x, threshold, mask), x.float(), 0.0)
    return (xa @ w_t.float()).to(x.dtype)


@C.on_input_device
def _triton_impl(x: torch.Tensor, w_t: torch.Tensor, threshold: Optional[torch.Tensor] = None,
                 mask: Optional[torch.Tensor] = None,
                 config: Optional[C.LaunchConfig] = None,
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Run the Triton kernel (CUDA, or CPU tensors under TRITON_INTERPRET=1).

    ``config`` forces a launch config (tests); by default it is tuned once per shape. ``out``
    ([B, N] contiguous, x's dtype) receives y, e.g. a NaN-filled buffer in tests.
    """
    B, K, N = _validate(x, w_t, threshold, mask)
    C.require_kernels(x.device)
    from ._input_sparse_kernel import MODE_MASK, MODE_THRESHOLD

    if threshold is not None:
        mode, thrs, m = MODE_THRESHOLD, [C.expand_threshold(threshold, B, K, x.device, "")], None
    else:
        mode, thrs, m = MODE_MASK, None, C.expand_mask(mask, B, K, x.device, "")
    y = C.output_buffer(out, (B, N), x.dtype, x.device)
    _launch_chunks(x, [w_t], mode, thrs, m, y, config)
    return y


def _launch_chunks(x: torch.Tensor, w_ts: list[torch.Tensor], mode: int,
                   thrs: Optional[list[torch.Tensor]], mask: Optional[torch.Tensor],
                   y: torch.Tensor, config: Optional[C.LaunchConfig]) -> None:
    """One launch per MAX_BATCH_PER_LAUNCH sequences (thresholds / mask already [B, K] views)."""
    from ._input_sparse_kernel import launch_input_sparse

    step = C.MAX_BATCH_PER_LAUNCH
    for b0 in range(0, x.shape[0], step):
        sl = slice(b0, min(x.shape[0], b0 + step))
        cfg = config or pick_config(w_ts, sl.stop - sl.start)
        launch_input_sparse(x[sl], w_ts, mode, None if thrs is None else [t[sl] for t in thrs],
                            None if mask is None else mask[sl], y[sl], cfg)


def pick_config(w_t: torch.Tensor | Sequence[torch.Tensor], batch: int) -> C.LaunchConfig:
    """Launch config for this weight (or group of weights) and batch, tuned once per (batch, K,
    widths, dtype, device)."""
    from . import _input_sparse_kernel as kern

    w_ts = [w_t] if isinstance(w_t, torch.Tensor) else list(w_t)
    K = w_ts[0].shape[0]
    widths = tuple(w.shape[1] for w in w_ts)
    N = sum(widths)
    dev, dtype = w_ts[0].device, w_ts[0].dtype
    key = ("input_sparse", batch, K, widths, dtype, str(dev), kern.PREFETCH_CANDIDATES)

    def make_bench(sparsity: float):
        x = torch.randn(batch, K, device=dev, dtype=dtype)
        m = C.row_pattern(K, sparsity, dev).expand(batch, K)
        out = torch.empty(batch, N, device=dev, dtype=dtype)
        return lambda cfg: kern.launch_input_sparse(x, w_ts, kern.MODE_MASK, None, m, out, cfg)

    cands = kern.candidates(batch, K, N, C.sm_count(dev))
    return C.tuned_config(key, cands, make_bench, dev)


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
        return _triton_impl(x, w_t, threshold, mask)
    return input_sparse_gemv_ref(x, w_t, threshold, mask)


@input_sparse_gemv.register_fake
def _(x: torch.Tensor, w_t: torch.Tensor, threshold: Optional[torch.Tensor] = None,
      mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    B, _, N = _validate(x, w_t, threshold, mask)
    return x.new_empty((B, N))


def _validate_grouped(x: torch.Tensor, w_ts: Sequence[torch.Tensor],
                      thresholds: Sequence[torch.Tensor]) -> tuple[int, int, list[int]]:
    from ._input_sparse_kernel import MAX_GROUPS

    if not 1 <= len(w_ts) <= MAX_GROUPS:
        raise ValueError(f"input_sparse_gemv_grouped takes 1 to {MAX_GROUPS} weights, "
                         f"got {len(w_ts)}")
    if len(thresholds) != len(w_ts):
        raise ValueError(f"one threshold per weight: {len(w_ts)} weights, "
                         f"{len(thresholds)} thresholds")
    widths = []
    for w_t, t in zip(w_ts, thresholds):
        B, K, N = _validate(x, w_t, t, None)
        widths.append(N)
    return B, K, widths


def input_sparse_gemv_grouped_ref(x: torch.Tensor, w_ts: Sequence[torch.Tensor],
                                  thresholds: Sequence[torch.Tensor]) -> torch.Tensor:
    """Reference of the grouped op: x [B, K], w_ts [K, N_g] -> [B, sum N_g]."""
    _validate_grouped(x, w_ts, thresholds)
    return torch.cat([input_sparse_gemv_ref(x, w, t) for w, t in zip(w_ts, thresholds)], 1)


@C.on_input_device
def _grouped_triton_impl(x: torch.Tensor, w_ts: Sequence[torch.Tensor],
                         thresholds: Sequence[torch.Tensor],
                         config: Optional[C.LaunchConfig] = None,
                         out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The grouped op's Triton path (CUDA, or CPU tensors under TRITON_INTERPRET=1)."""
    B, K, widths = _validate_grouped(x, w_ts, thresholds)
    C.require_kernels(x.device)
    from ._input_sparse_kernel import MODE_THRESHOLD

    thrs = [C.expand_threshold(t, B, K, x.device, "") for t in thresholds]
    y = C.output_buffer(out, (B, sum(widths)), x.dtype, x.device)
    _launch_chunks(x, list(w_ts), MODE_THRESHOLD, thrs, None, y, config)
    return y


@torch.library.custom_op("sparseffn::input_sparse_gemv_grouped", mutates_args=())
def input_sparse_gemv_grouped(x: torch.Tensor, w_ts: list[torch.Tensor],
                              thresholds: list[torch.Tensor]) -> torch.Tensor:
    """[B, sum N_g]: ``input_sparse_gemv(x, w_ts[g], thresholds[g])`` for every g, side by side,
    in one launch (see module docstring). Up to three weights, all [K, N_g] of x's dtype.
    """
    if C.kernels_available(x.device):  # CUDA, or CPU tensors under TRITON_INTERPRET=1
        return _grouped_triton_impl(x, w_ts, thresholds)
    return input_sparse_gemv_grouped_ref(x, w_ts, thresholds)


@input_sparse_gemv_grouped.register_fake
def _(x: torch.Tensor, w_ts: list[torch.Tensor],
      thresholds: list[torch.Tensor]) -> torch.Tensor:
    B, _, widths = _validate_grouped(x, w_ts, thresholds)
    return x.new_empty((B, sum(widths)))
