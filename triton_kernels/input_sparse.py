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
"""
from __future__ import annotations

from typing import Optional

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
    from ._input_sparse_kernel import MODE_MASK, MODE_THRESHOLD, launch_input_sparse

    if threshold is not None:
        mode, thr, m = MODE_THRESHOLD, C.expand_threshold(threshold, B, K, x.device, ""), None
    else:
        mode, thr, m = MODE_MASK, None, C.expand_mask(mask, B, K, x.device, "")
    y = C.output_buffer(out, (B, N), x.dtype, x.device)
    step = C.MAX_BATCH_PER_LAUNCH
    for b0 in range(0, B, step):
        sl = slice(b0, min(B, b0 + step))
        cfg = config or pick_config(w_t, sl.stop - sl.start)
        launch_input_sparse(x[sl], w_t, mode, None if thr is None else thr[sl],
                            None if m is None else m[sl], y[sl], cfg)
    return y


def pick_config(w_t: torch.Tensor, batch: int) -> C.LaunchConfig:
    """Launch config for this weight and batch, tuned once per (batch, K, N, dtype, device)."""
    from ._input_sparse_kernel import MODE_MASK, candidates, launch_input_sparse

    K, N = w_t.shape
    dev = w_t.device
    key = ("input_sparse", batch, K, N, w_t.dtype, str(dev))

    def make_bench(sparsity: float):
        x = torch.randn(batch, K, device=dev, dtype=w_t.dtype)
        m = C.row_pattern(K, sparsity, dev).expand(batch, K)
        out = torch.empty(batch, N, device=dev, dtype=w_t.dtype)
        return lambda cfg: launch_input_sparse(x, w_t, MODE_MASK, None, m, out, cfg)

    cands = candidates(batch, K, N, C.sm_count(dev))
    return C.tuned_config(key, cands, make_bench, dev)


@torch.library.custom_op("sparseffn::input_sparse_gemv", mutates_args=())
def input_sparse_gemv(x: torch.Tensor, w_t: torch.Tensor,
                      threshold: Optional[torch.Tensor] = None,
                      mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y [B, N] = sum over active k of x[b, k] * w_t[k, :] (see module docstring).

    Give exactly one of ``threshold`` (float32, broadcastable to [B, K]; active = |x| > threshold)
    and ``mask`` (bool, broadcastable to [B, K]). CUDA tensors run the Triton kernel, others the
    reference.
    """
    if x.is_cuda and C.kernels_available(x.device):
        return _triton_impl(x, w_t, threshold, mask)
    return input_sparse_gemv_ref(x, w_t, threshold, mask)


@input_sparse_gemv.register_fake
def _(x: torch.Tensor, w_t: torch.Tensor, threshold: Optional[torch.Tensor] = None,
      mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    B, _, N = _validate(x, w_t, threshold, mask)
    return x.new_empty((B, N))
