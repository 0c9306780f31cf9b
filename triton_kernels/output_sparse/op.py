"""Output-sparse GEMV op: compute only the outputs a mask asks for, skipping the other weight rows
(semantics in ``reference``).

Used for the up (and, under predictors, gate) projection when the active neurons are known before
the projection (CATS/CHESS masks from the gate, predictor masks). Rows that no sequence of the
launch needs are never loaded.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import common as C
from ..tuning import LaunchConfig, tuned_config
from .reference import output_sparse_gemv_ref, validate


@C.on_input_device
def triton_impl(x: torch.Tensor, w: torch.Tensor, mask: torch.Tensor,
                config: Optional[LaunchConfig] = None,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Run the Triton kernel (CUDA, or CPU tensors under TRITON_INTERPRET=1).

    ``config`` forces a launch config (tests); by default it is tuned once per shape. ``out``
    ([B, N] contiguous, x's dtype) receives y, e.g. a NaN-filled buffer in tests.
    """
    B, K, N = validate(x, w, mask)
    C.require_kernels(x.device)
    from .kernel import launch_output_sparse

    m = C.expand_mask(mask, B, N, x.device, "")
    y = C.output_buffer(out, (B, N), x.dtype, x.device)
    step = C.MAX_BATCH_PER_LAUNCH
    for b0 in range(0, B, step):
        sl = slice(b0, min(B, b0 + step))
        cfg = config or pick_config(w, sl.stop - sl.start)
        launch_output_sparse(x[sl], w, m[sl], y[sl], cfg)
    return y


def pick_config(w: torch.Tensor, batch: int) -> LaunchConfig:
    """Launch config for this weight and batch, tuned once per (batch, N, K, dtype, device)."""
    from .kernel import candidates, launch_output_sparse

    N, K = w.shape
    dev = w.device
    key = ("output_sparse", batch, N, K, w.dtype, str(dev))

    def make_bench(sparsity: float):
        x = torch.randn(batch, K, device=dev, dtype=w.dtype)
        m = C.row_pattern(N, sparsity, dev).expand(batch, N)
        out = torch.empty(batch, N, device=dev, dtype=w.dtype)
        return lambda cfg: launch_output_sparse(x, w, m, out, cfg)

    return tuned_config(key, candidates(batch, N, K), make_bench, dev)


@torch.library.custom_op("sparseffn::output_sparse_gemv", mutates_args=())
def output_sparse_gemv(x: torch.Tensor, w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """y [B, N] = (x @ w.T) where mask, exactly 0 elsewhere (see module docstring).

    CUDA tensors (and CPU tensors under TRITON_INTERPRET=1) run the Triton kernel, others the
    reference.
    """
    if C.kernels_available(x.device):  # CUDA, or CPU tensors under TRITON_INTERPRET=1
        return triton_impl(x, w, mask)
    return output_sparse_gemv_ref(x, w, mask)


@output_sparse_gemv.register_fake
def _(x: torch.Tensor, w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    B, _, N = validate(x, w, mask)
    return x.new_empty((B, N))
