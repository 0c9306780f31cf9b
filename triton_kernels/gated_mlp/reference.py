"""Sparse gated MLP: validation and the plain-PyTorch references (the CPU path).

Semantics (``torch.ops.sparseffn.sparse_gated_mlp``), all products accumulated in fp32::

    g      = r(act(r(x @ w_gate.T)))                 [B, I]
    active = |g| > threshold    or    active = mask  [B, I]
    h      = r(g * r(x @ w_up.T)) where active else 0
    y      = h @ w_down_t                            [B, H]  in x's dtype

where r() rounds to x's dtype: every intermediate is rounded where the dense module (nn.Linear
and the activation, in x's dtype) rounds it, so the threshold sees the values the reference path
of ``sparseffn.modules`` sees and decides each neuron as it does. ``sparse_gate_up`` is the first
half, returning h [B, I].

x [B, H] (any strides); w_gate, w_up [I, H] (nn.Linear layout, unit stride along H); w_down_t
[I, H] = down_proj.weight [H, I] transposed once at patch time, so that an inactive neuron's down
weights are a contiguous row. ``threshold`` (float32, broadcastable to [B, I]) serves the
cats/chess/topk criteria; ``mask`` (bool, broadcastable to [B, I]) serves predictors.
``activation``: "silu" or "gelu_tanh" (Gemma).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import common as C

ACTIVATIONS = ("silu", "gelu_tanh")


def validate(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down_t: torch.Tensor,
             threshold: Optional[torch.Tensor], mask: Optional[torch.Tensor],
             activation: str) -> tuple[int, int, int]:
    """(B, H, I) of a valid call, or a ValueError naming the fix."""
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


def validate_gate_up(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                     threshold: Optional[torch.Tensor], mask: Optional[torch.Tensor],
                     activation: str) -> tuple[int, int, int]:
    # The gate/up half has no down weight; validate it with w_gate standing in for w_down_t.
    return validate(x, w_gate, w_up, w_gate, threshold, mask, activation)


def activation_ref(g: torch.Tensor, activation: str) -> torch.Tensor:
    return F.silu(g) if activation == "silu" else F.gelu(g, approximate="tanh")


def sparse_gate_up_ref(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                       threshold: Optional[torch.Tensor] = None,
                       mask: Optional[torch.Tensor] = None,
                       activation: str = "silu") -> torch.Tensor:
    """Plain-PyTorch reference of ``sparse_gate_up``. x [B, H] -> h [B, I] in x's dtype."""
    validate_gate_up(x, w_gate, w_up, threshold, mask, activation)
    xf = x.float()

    def r(v: torch.Tensor) -> torch.Tensor:  # rounded to x's dtype, as the dense module rounds
        return v.to(x.dtype).float()
    g = r(activation_ref(r(xf @ w_gate.float().t()), activation))
    active = g.abs() > threshold.float() if threshold is not None else mask.expand_as(g)
    return torch.where(active, g * r(xf @ w_up.float().t()), 0.0).to(x.dtype)


def sparse_gated_mlp_ref(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                         w_down_t: torch.Tensor, threshold: Optional[torch.Tensor] = None,
                         mask: Optional[torch.Tensor] = None,
                         activation: str = "silu") -> torch.Tensor:
    """Plain-PyTorch reference (and the CPU implementation). x [B, H] -> y [B, H]."""
    validate(x, w_gate, w_up, w_down_t, threshold, mask, activation)
    h = sparse_gate_up_ref(x, w_gate, w_up, threshold, mask, activation)
    return (h.float() @ w_down_t.float()).to(x.dtype)
