"""Sparse gated (SwiGLU / GeGLU) MLP for decoding: gate, activation, mask, up, multiply and down.

Semantics (``torch.ops.sparseffn.sparse_gated_mlp``), all products accumulated in fp32::

    g      = r(act(r(x @ w_gate.T)))                 [B, I]
    active = |g| > threshold    or    active = mask  [B, I]
    h      = r(g * r(x @ w_up.T)) where active else 0
    y      = h @ w_down_t                            [B, H]  in x's dtype

where r() rounds to x's dtype: every intermediate is rounded where the dense module (nn.Linear
and the activation, in x's dtype) rounds it, so the threshold sees the values the reference path
of ``sparseffn.modules`` sees and decides each neuron as it does.

x [B, H] (any strides); w_gate, w_up [I, H] (nn.Linear layout, unit stride along H); w_down_t
[I, H] = down_proj.weight [H, I] transposed once at patch time, so that an inactive neuron's down
weights are a contiguous row. ``threshold`` (float32, broadcastable to [B, I]) serves the
cats/chess/topk criteria: the gate is computed densely and the up and down rows of inactive
neurons are never loaded. ``mask`` (bool, broadcastable to [B, I]) serves predictors: the gate
rows of inactive neurons are skipped too. ``activation``: "silu" or "gelu_tanh" (Gemma).

Two passes over memory, each weight read once: a gate/up kernel (one program per block of
neurons: gate, activation, threshold, then up only where active) writes the small h [B, I]; the
input-sparse GEMV then reads only the down rows where h != 0 (a row with h == 0 adds nothing, so
skipping it is exact). Fusing the down product into the first pass would need a [B, H] fp32
reduction across all programs of the grid, which costs more than the 2*B*I bytes of h it saves.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import _common as C

ACTIVATIONS = ("silu", "gelu_tanh")


def _validate(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down_t: torch.Tensor,
              threshold: Optional[torch.Tensor], mask: Optional[torch.Tensor],
              activation: str) -> tuple[int, int, int]:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError("x must be a 2-D tensor [B, H]")
    C.check_float_dtype("x", x)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    B, H = x.shape
    if w_gate.dim() != 2 or w_gate.shape[1] != H:
        raise ValueError(f"w_gate must be [I, H] with H={H} matching x; got {list(w_gate.shape)}")
    I = w_gate.shape[0]
    C.check_matrix("w_gate", w_gate, I, H, x.dtype, x.device, contiguous_rows=True)
    C.check_matrix("w_up", w_up, I, H, x.dtype, x.device, contiguous_rows=True)
    C.check_matrix("w_down_t (down_proj.weight.t().contiguous())", w_down_t, I, H, x.dtype,
                   x.device, contiguous_rows=True)
    C.exactly_one(threshold, mask)
    if threshold is not None:
        C.expand_threshold(threshold, B, I, x.device, "[B, I] of the gate")
    else:
        C.expand_mask(mask, B, I, x.device, "[B, I] of the gate")
    return B, H, I


def _act_ref(g: torch.Tensor, activation: str) -> torch.Tensor:
    return F.silu(g) if activation == "silu" else F.gelu(g, approximate="tanh")


def sparse_gated_mlp_ref(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                         w_down_t: torch.Tensor, threshold: Optional[torch.Tensor] = None,
                         mask: Optional[torch.Tensor] = None,
                         activation: str = "silu") -> torch.Tensor:
    """Plain-PyTorch reference (and the CPU implementation). x [B, H] -> y [B, H]."""
    _validate(x, w_gate, w_up, w_down_t, threshold, mask, activation)
    h = sparse_gate_up_ref(x, w_gate, w_up, threshold, mask, activation)
    return (h.float() @ w_down_t.float()).to(x.dtype)


def _validate_gate_up(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                      threshold: Optional[torch.Tensor], mask: Optional[torch.Tensor],
                      activation: str) -> tuple[int, int, int]:
    # The gate/up half has no down weight; validate it with w_gate standing in for w_down_t.
    return _validate(x, w_gate, w_up, w_gate, threshold, mask, activation)


def sparse_gate_up_ref(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                       threshold: Optional[torch.Tensor] = None,
                       mask: Optional[torch.Tensor] = None,
                       activation: str = "silu") -> torch.Tensor:
    """Plain-PyTorch reference of ``sparse_gate_up``. x [B, H] -> h [B, I] in x's dtype."""
    _validate_gate_up(x, w_gate, w_up, threshold, mask, activation)
    xf = x.float()

    def r(v: torch.Tensor) -> torch.Tensor:  # rounded to x's dtype, as the dense module rounds
        return v.to(x.dtype).float()
    g = r(_act_ref(r(xf @ w_gate.float().t()), activation))
    active = g.abs() > threshold.float() if threshold is not None else mask.expand_as(g)
    return torch.where(active, g * r(xf @ w_up.float().t()), 0.0).to(x.dtype)


@C.on_input_device
def _gate_up_triton(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                    threshold: Optional[torch.Tensor] = None,
                    mask: Optional[torch.Tensor] = None, activation: str = "silu",
                    config: Optional[C.LaunchConfig] = None,
                    out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The gate/up kernel alone (CUDA, or CPU tensors under TRITON_INTERPRET=1)."""
    B, H, I = _validate_gate_up(x, w_gate, w_up, threshold, mask, activation)
    C.require_kernels(x.device)
    from ._output_sparse_kernel import ACT_GELU_TANH, ACT_SILU, launch_gate_up

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
def _triton_impl(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                 w_down_t: torch.Tensor, threshold: Optional[torch.Tensor] = None,
                 mask: Optional[torch.Tensor] = None, activation: str = "silu",
                 config: Optional[C.LaunchConfig] = None,
                 down_config: Optional[C.LaunchConfig] = None,
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Run the Triton kernels (CUDA, or CPU tensors under TRITON_INTERPRET=1).

    ``config`` / ``down_config`` force the gate/up and down launch configs (tests); ``out``
    ([B, H] contiguous, x's dtype) receives y.
    """
    B, H, I = _validate(x, w_gate, w_up, w_down_t, threshold, mask, activation)
    C.require_kernels(x.device)
    from ._input_sparse_kernel import MODE_NONZERO, launch_input_sparse
    from .input_sparse import pick_config as pick_down_config

    h = _gate_up_triton(x, w_gate, w_up, threshold, mask, activation, config,
                        out=C.scratch((B, I), x.dtype, x.device))
    y = C.output_buffer(out, (B, H), x.dtype, x.device)
    step = C.MAX_BATCH_PER_LAUNCH
    for b0 in range(0, B, step):
        sl = slice(b0, min(B, b0 + step))
        launch_input_sparse(h[sl], w_down_t, MODE_NONZERO, None, None, y[sl],
                            down_config or pick_down_config(w_down_t, sl.stop - sl.start))
    return y


def pick_config(w_gate: torch.Tensor, w_up: torch.Tensor, batch: int,
                use_mask: bool) -> C.LaunchConfig:
    """Gate/up launch config, tuned once per (mode, batch, I, H, dtype, device)."""
    from ._output_sparse_kernel import ACT_SILU, candidates, launch_gate_up

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

    return C.tuned_config(key, candidates(batch, I, H), make_bench, dev)


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
        return _triton_impl(x, w_gate, w_up, w_down_t, threshold, mask, activation)
    return sparse_gated_mlp_ref(x, w_gate, w_up, w_down_t, threshold, mask, activation)


@sparse_gated_mlp.register_fake
def _(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down_t: torch.Tensor,
      threshold: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
      activation: str = "silu") -> torch.Tensor:
    B, H, _ = _validate(x, w_gate, w_up, w_down_t, threshold, mask, activation)
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
        return _gate_up_triton(x, w_gate, w_up, threshold, mask, activation)
    return sparse_gate_up_ref(x, w_gate, w_up, threshold, mask, activation)


@sparse_gate_up.register_fake
def _(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
      threshold: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
      activation: str = "silu") -> torch.Tensor:
    B, _, I = _validate_gate_up(x, w_gate, w_up, threshold, mask, activation)
    return x.new_empty((B, I))
