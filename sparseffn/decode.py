"""The kernel path's operations: thin calls into ``triton_kernels``.

Each function is one decode-step operation on [B, K] activations (one token per sequence),
named for what it computes; the sparse modules and the methods' neuron gates compose them into
decode plans, and ``sparseffn.dispatch`` decides when they run. ``cpu`` selects the op's CPU
decode path (called directly: the custom-op dispatcher costs more than a small CPU product);
otherwise the custom op (Triton on CUDA, or on CPU tensors through the interpreter), which
``torch.compile`` and CUDA graphs capture. Weights the input-sparse ops skip rows of are stored
input-major (``sparseffn.layout``), so ``weight.t()`` is contiguous.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import triton_kernels as tk  # also registers the torch.ops.sparseffn.* custom ops


def _input_sparse(cpu: bool):
    return tk.input_sparse_gemv_cpu if cpu else torch.ops.sparseffn.input_sparse_gemv


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           threshold: torch.Tensor | None, cpu: bool = False) -> torch.Tensor:
    """x [B, K] -> [B, N]: the input-sparse GEMV on an input-major weight, or dense."""
    if threshold is None:
        return F.linear(x, weight, bias)
    y = _input_sparse(cpu)(x, weight.t(), threshold=threshold)
    return y if bias is None else y + bias


def grouped_linear(x: torch.Tensor, weights: list[torch.Tensor],
                   biases: list[torch.Tensor | None], thresholds: list[torch.Tensor],
                   cpu: bool = False) -> list[torch.Tensor]:
    """x [B, K] -> one [B, N_g] per weight: the input-sparse GEMV of every input-major weight
    with its own threshold, in one launch (outputs are views of one [B, sum N_g] tensor)."""
    grouped = tk.input_sparse_gemv_grouped_cpu if cpu \
        else torch.ops.sparseffn.input_sparse_gemv_grouped
    y = grouped(x, [w.t() for w in weights], list(thresholds))
    outs = y.split([w.shape[0] for w in weights], dim=-1)
    return [o if b is None else o + b for o, b in zip(outs, biases)]


def gated_act(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, threshold: torch.Tensor,
              activation: str, cpu: bool = False) -> torch.Tensor:
    """h [B, I] = act(gate) * up on neurons with |act(gate)| > threshold, zeros elsewhere."""
    gate_up = tk.sparse_gate_up_cpu if cpu else torch.ops.sparseffn.sparse_gate_up
    return gate_up(x, w_gate, w_up, threshold=threshold, activation=activation)


def gated_threshold(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                    w_down: torch.Tensor, threshold: torch.Tensor, activation: str,
                    zero: torch.Tensor, cpu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole MLP [B, H] -> [B, H] under |act(gate)| > threshold: (y, a tensor whose nonzero
    entries [B, I] are the neurons that contributed). The gate is read densely, up and down
    rows of active neurons only (down stored input-major)."""
    if cpu:
        return tk.sparse_gated_mlp_threshold_cpu(x, w_gate, w_up, w_down.t(), threshold,
                                                 activation)
    h = gated_act(x, w_gate, w_up, threshold, activation)
    return down_nonzero(h, w_down, zero), h


def down_nonzero(h: torch.Tensor, w_down: torch.Tensor, zero: torch.Tensor,
                 cpu: bool = False) -> torch.Tensor:
    """h [B, I] @ w_down.T reading only the rows of neurons with h != 0 (``zero`` = 0.0)."""
    return _input_sparse(cpu)(h, w_down.t(), threshold=zero)


def gated_masked(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                 w_down: torch.Tensor, mask: torch.Tensor, activation: str,
                 cpu: bool = False) -> torch.Tensor:
    """The whole MLP [B, H] -> [B, H] on the neurons of ``mask`` [B, I] only: gate, up and
    down rows of the others are never read (down stored input-major)."""
    mlp = tk.sparse_gated_mlp_cpu if cpu else torch.ops.sparseffn.sparse_gated_mlp
    return mlp(x, w_gate, w_up, w_down.t(), mask=mask, activation=activation)


def up_masked(x: torch.Tensor, w_up: torch.Tensor, mask: torch.Tensor,
              cpu: bool = False) -> torch.Tensor:
    """up(x) [B, I] on the rows of ``mask`` only, exact zeros elsewhere."""
    up = tk.output_sparse_gemv_cpu if cpu else torch.ops.sparseffn.output_sparse_gemv
    return up(x, w_up, mask)


def down_masked(h: torch.Tensor, w_down: torch.Tensor, mask: torch.Tensor,
                cpu: bool = False) -> torch.Tensor:
    """h [B, I] @ w_down.T reading only the rows in ``mask``."""
    return _input_sparse(cpu)(h, w_down.t(), mask=mask)
