"""The CPU decode path of the sparse gated MLP and its gate/up half.

``sparse_gate_up_cpu`` computes the gate densely (its magnitude decides), then only the up rows
of active neurons; ``sparse_gated_mlp_cpu`` takes the neurons as a mask and reads only their
gate, up and down rows. Same semantics as ``reference`` at fp32, where no intermediate rounding
applies; unchecked; see ``sparseffn.dispatch`` for where it is used.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..input_sparse.cpu import input_sparse_gemv_cpu
from ..output_sparse.cpu import output_sparse_gemv_cpu
from .reference import activation_ref


def sparse_gate_up_cpu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                       threshold: Optional[torch.Tensor] = None,
                       mask: Optional[torch.Tensor] = None,
                       activation: str = "silu") -> torch.Tensor:
    """x [B, H], w_gate and w_up [I, H] -> h [B, I] = act(gate) * up on active neurons."""
    g = activation_ref(F.linear(x, w_gate), activation)
    active = g.float().abs() > threshold.float() if threshold is not None \
        else mask.expand_as(g)
    return torch.where(active, g * output_sparse_gemv_cpu(x, w_up, active), 0)


def sparse_gated_mlp_threshold_cpu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                                   w_down_t: torch.Tensor, threshold: torch.Tensor,
                                   activation: str = "silu"
                                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole MLP under a threshold on |act(gate)|, fused for the CPU: (y [B, H], active
    bool [B, I]). Same function as ``sparse_gate_up`` then the input-sparse GEMV over h != 0.

    One sequence (the decode step): the active neurons' up rows are gathered once and their
    down rows summed by ``embedding_bag`` with weights act * up, so no [I]-wide intermediate is
    built and the active set is found once.
    """
    g = activation_ref(F.linear(x, w_gate), activation)
    active = g.float().abs() > threshold.float()
    if x.shape[0] != 1:
        h = torch.where(active, g * output_sparse_gemv_cpu(x, w_up, active), 0)
        return input_sparse_gemv_cpu(h, w_down_t, threshold=torch.zeros(())), active
    rows = active[0].nonzero().squeeze(1)
    coef = g[0].index_select(0, rows) * (w_up.index_select(0, rows) @ x[0])
    y = F.embedding_bag(rows.unsqueeze(0), w_down_t, mode="sum",
                        per_sample_weights=coef.unsqueeze(0))
    return y, active


def sparse_gated_mlp_cpu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                         w_down_t: torch.Tensor, threshold: Optional[torch.Tensor] = None,
                         mask: Optional[torch.Tensor] = None,
                         activation: str = "silu") -> torch.Tensor:
    """x [B, H] -> y [B, H]; w_down_t [I, H] = down_proj.weight transposed (rows contiguous).

    With a mask, gate rows of inactive neurons are never read: gate and up are computed on the
    union of the sequences' active neurons only.
    """
    if threshold is not None:
        h = sparse_gate_up_cpu(x, w_gate, w_up, threshold=threshold, activation=activation)
        return input_sparse_gemv_cpu(h, w_down_t, threshold=torch.zeros((), device=x.device))
    mask = mask.expand(x.shape[0], w_gate.shape[0])
    rows = mask.any(dim=0).nonzero().squeeze(1)
    g = activation_ref(x @ w_gate.index_select(0, rows).t(), activation)
    u = x @ w_up.index_select(0, rows).t()
    h = torch.where(mask[:, rows], g * u, 0)
    return h @ w_down_t.index_select(0, rows)
