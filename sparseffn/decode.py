"""The kernel path's operations: thin calls into ``triton_kernels``' custom ops.

Each function is one decode-step operation on [B, K] activations (one token per sequence),
named for what it computes; the sparse modules and the methods' neuron gates compose them into
decode plans, and ``sparseffn.dispatch`` decides when they run. Weights the input-sparse ops
skip rows of are stored input-major (``sparseffn.layout``), so ``weight.t()`` is contiguous.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import triton_kernels  # noqa: F401 - registers the torch.ops.sparseffn.* custom ops


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           threshold: torch.Tensor | None) -> torch.Tensor:
    """x [B, K] -> [B, N]: ``input_sparse_gemv`` on an input-major weight, or dense."""
    if threshold is None:
        return F.linear(x, weight, bias)
    y = torch.ops.sparseffn.input_sparse_gemv(x, weight.t(), threshold=threshold)
    return y if bias is None else y + bias


def grouped_linear(x: torch.Tensor, weights: list[torch.Tensor],
                   biases: list[torch.Tensor | None],
                   thresholds: list[torch.Tensor]) -> list[torch.Tensor]:
    """x [B, K] -> one [B, N_g] per weight: ``input_sparse_gemv`` of every input-major weight
    with its own threshold, in one launch (outputs are views of one [B, sum N_g] tensor)."""
    y = torch.ops.sparseffn.input_sparse_gemv_grouped(x, [w.t() for w in weights],
                                                       list(thresholds))
    outs = y.split([w.shape[0] for w in weights], dim=-1)
    return [o if b is None else o + b for o, b in zip(outs, biases)]


def gated_act(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, threshold: torch.Tensor,
              activation: str) -> torch.Tensor:
    """h [B, I] = act(gate) * up on neurons with |act(gate)| > threshold, zeros elsewhere."""
    return torch.ops.sparseffn.sparse_gate_up(x, w_gate, w_up, threshold=threshold,
                                              activation=activation)


def down_nonzero(h: torch.Tensor, w_down: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """h [B, I] @ w_down.T reading only the rows of neurons with h != 0 (``zero`` = 0.0)."""
    return torch.ops.sparseffn.input_sparse_gemv(h, w_down.t(), threshold=zero)


def gated_masked(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                 w_down: torch.Tensor, mask: torch.Tensor, activation: str) -> torch.Tensor:
    """The whole MLP [B, H] -> [B, H] on the neurons of ``mask`` [B, I] only: gate, up and
    down rows of the others are never read (down stored input-major)."""
    return torch.ops.sparseffn.sparse_gated_mlp(x, w_gate, w_up, w_down.t(), mask=mask,
                                                activation=activation)


def up_masked(x: torch.Tensor, w_up: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """up(x) [B, I] on the rows of ``mask`` only, exact zeros elsewhere."""
    return torch.ops.sparseffn.output_sparse_gemv(x, w_up, mask)


def down_masked(h: torch.Tensor, w_down: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """h [B, I] @ w_down.T reading only the rows in ``mask``."""
    return torch.ops.sparseffn.input_sparse_gemv(h, w_down.t(), mask=mask)
