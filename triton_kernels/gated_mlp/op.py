"""Sparse gated (SwiGLU / GeGLU) MLP ops for decoding: gate, activation, mask, up, multiply and
down (semantics in ``reference``).

``threshold`` criteria compute the gate densely and never load the up and down rows of inactive
neurons; ``mask`` criteria (predictors) skip their gate rows too.

Two passes over memory, each weight read once: a gate/up kernel (one program per block of
neurons: gate, activation, threshold, then up only where active) writes the small h [B, I]; the
input-sparse GEMV then reads only the down rows where h != 0 (a row with h == 0 adds nothing, so
skipping it is exact). Fusing the down product into the first pass would need a [B, H] fp32
reduction across all programs of the grid, which costs more than the 2*B*I bytes of h it saves.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import common as C
from ..tuning import LaunchConfig, tuned_config
from .reference import sparse_gate_up_ref, sparse_gated_mlp_ref, validate, validate_gate_up


@C.on_input_device
def gate_up_triton_impl(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                        threshold: Optional[torch.Tensor] = None,
                        mask: Optional[torch.Tensor] = None, activation: str = "silu",
                        config: Optional[LaunchConfig] = None,
                        out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The gate/up kernel alone (CUDA, or CPU tensors under TRITON_INTERPRET=1)."""
    B, H, I = validate_gate_up(x, w_gate, w_up, threshold, mask, activation)
    C.require_kernels(x.device)
    from .kernel import ACT_GELU_TANH, ACT_SILU, launch_gate_up

    act = ACT_SILU if activation == "silu" else ACT_GELU_TANH
    thr = None if threshold is None else C.expand_threshold(threshold, B, I, x.device, "")
    m = None if mask is None else C.expand_mask(mask, B, I, x.device, "")
    h = C.output_buffer(out, (B, I), x.dtype, x.device)
    step = C.MAX_BATCH_PER_LAUNCH
    for b0 in range(0, B, step):
        sl = slice(b0, min(B, b0 + step))
        cfg = config or pick_config(w_gate, w_up, sl.stop - sl.start, use_mask=mask is not None)
        launch_gate_up(x[sl], w_gate, w_up, None if thr is None else thr[sl],
                       None if m is None else m[sl], act, h[sl], cfg)
    return h


@C.on_input_device
def triton_impl(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                w_down_t: torch.Tensor, threshold: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None, activation: str = "silu",
                config: Optional[LaunchConfig] = None,
                down_config: Optional[LaunchConfig] = None,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Run the Triton kernels (CUDA, or CPU tensors under TRITON_INTERPRET=1).

    ``config`` / ``down_config`` force the gate/up and down launch configs (tests); ``out``
    ([B, H] contiguous, x's dtype) receives y.
    """
    B, H, I = validate(x, w_gate, w_up, w_down_t, threshold, mask, activation)
    C.require_kernels(x.device)
    from ..input_sparse.kernel import MODE_NONZERO, launch_input_sparse
    from ..input_sparse.op import pick_config as pick_down_config

    h = gate_up_triton_impl(x, w_gate, w_up, threshold, mask, activation, config,
                            out=C.scratch((B, I), x.dtype, x.device))
    y = C.output_buffer(out, (B, H), x.dtype, x.device)
    step = C.MAX_BATCH_PER_LAUNCH
    for b0 in range(0, B, step):
        sl = slice(b0, min(B, b0 + step))
        launch_input_sparse(h[sl], w_down_t, MODE_NONZERO, None, None, y[sl],
                            down_config or pick_down_config(w_down_t, sl.stop - sl.start))
    return y


def pick_config(w_gate: torch.Tensor, w_up: torch.Tensor, batch: int,
                use_mask: bool) -> LaunchConfig:
    """Gate/up launch config, tuned once per (mode, batch, I, H, dtype, device)."""
    from .kernel import ACT_SILU, candidates, launch_gate_up

    I, H = w_gate.shape
    dev = w_gate.device
    key = ("gate_up", use_mask, batch, I, H, w_gate.dtype, str(dev))

    def make_bench(sparsity: float):
        x = torch.randn(batch, H, device=dev, dtype=w_gate.dtype)
        on = C.row_pattern(I, sparsity, dev)
        # Per-channel thresholds of -1 / +inf switch exactly the patterned rows on.
        thr = None if use_mask else torch.where(on, -1.0, float("inf")).expand(batch, I)
        m = on.expand(batch, I) if use_mask else None
        h = torch.empty(batch, I, device=dev, dtype=w_gate.dtype)
        return lambda cfg: launch_gate_up(x, w_gate, w_up, thr, m, ACT_SILU, h, cfg)

    return tuned_config(key, candidates(batch, I, H), make_bench, dev)


@torch.library.custom_op("sparseffn::sparse_gated_mlp", mutates_args=())
def sparse_gated_mlp(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                     w_down_t: torch.Tensor, threshold: Optional[torch.Tensor] = None,
                     mask: Optional[torch.Tensor] = None,
                     activation: str = "silu") -> torch.Tensor:
    """y [B, H] = down(h), h = act(gate) * up on active neurons only (see module docstring).

    Give exactly one of ``threshold`` and ``mask``. CUDA tensors (and CPU tensors under
    TRITON_INTERPRET=1) run the Triton kernels, others the reference.
    """
    if C.kernels_available(x.device):  # CUDA, or CPU tensors under TRITON_INTERPRET=1
        return triton_impl(x, w_gate, w_up, w_down_t, threshold, mask, activation)
    return sparse_gated_mlp_ref(x, w_gate, w_up, w_down_t, threshold, mask, activation)


@sparse_gated_mlp.register_fake
def _(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down_t: torch.Tensor,
      threshold: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
      activation: str = "silu") -> torch.Tensor:
    B, H, _ = validate(x, w_gate, w_up, w_down_t, threshold, mask, activation)
    return x.new_empty((B, H))


@torch.library.custom_op("sparseffn::sparse_gate_up", mutates_args=())
def sparse_gate_up(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                   threshold: Optional[torch.Tensor] = None,
                   mask: Optional[torch.Tensor] = None,
                   activation: str = "silu") -> torch.Tensor:
    """h [B, I] = act(gate) * up on active neurons, exact zeros elsewhere: the first half of
    ``sparse_gated_mlp``, for callers that need h itself (e.g. to count active neurons) before
    ``input_sparse_gemv(h, w_down_t, threshold=0)`` finishes the MLP. Same arguments.
    """
    if C.kernels_available(x.device):  # CUDA, or CPU tensors under TRITON_INTERPRET=1
        return gate_up_triton_impl(x, w_gate, w_up, threshold, mask, activation)
    return sparse_gate_up_ref(x, w_gate, w_up, threshold, mask, activation)


@sparse_gate_up.register_fake
def _(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
      threshold: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
      activation: str = "silu") -> torch.Tensor:
    B, _, I = validate_gate_up(x, w_gate, w_up, threshold, mask, activation)
    return x.new_empty((B, I))
