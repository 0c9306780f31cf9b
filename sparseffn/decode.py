"""The kernel path's operations: thin calls into ``triton_kernels``.

Each function is one decode-step operation on [B, K] activations (one token per sequence),
named for what it computes; the sparse modules and the methods' neuron gates compose them into
decode plans, and ``sparseffn.dispatch`` decides when they run. ``cpu`` selects the op's CPU
decode path (``triton_kernels.cpu``, compiled C++ called directly: the custom-op dispatcher
costs more than a small CPU product); otherwise the custom op runs (Triton on CUDA, or on CPU
tensors through the interpreter), which ``torch.compile`` and CUDA graphs capture. Weights the input-sparse ops skip rows of are stored
input-major (``sparseffn.layout``), so ``weight.t()`` is contiguous.

``counter`` (a site's ``SiteCounter``, or None when not tracking) receives the active entries
the op tested: the input-sparse ops (and so CATS/CHESS's down projection, which counts the
neurons with h != 0) increment its counts themselves, inside the kernel at no extra launch
(counting with a torch reduction per site and call cost about 16% of a decode step on an H100,
docs/e2e.md); plans that build a neuron mask in torch (predictors, coreinfer) count it there.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import triton_kernels as tk  # also registers the torch.ops.sparseffn.* custom ops


def above(magnitude: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """``magnitude > threshold`` compared in fp32, as the kernels compare.

    A 0-dim threshold would be rounded to a bf16/fp16 ``magnitude``'s dtype first (0-dim
    tensors do not take part in type promotion); as a [1] tensor it promotes the comparison.
    """
    return magnitude > (threshold if threshold.dim() else threshold.reshape(1))


def largest(score: torch.Tensor, k: int) -> torch.Tensor:
    """bool [..., C]: True at the ``k`` largest entries of ``score`` [..., C] along its last
    dimension (top-k's and the shared and core sets' choice)."""
    return torch.zeros_like(score, dtype=torch.bool).scatter_(-1, score.topk(k, dim=-1).indices,
                                                              True)


def _counts(counter) -> torch.Tensor | None:
    return None if counter is None else counter.counts


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           threshold: torch.Tensor | None, cpu: bool = False, counter=None,
           mask: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, K] -> [B, N]: the input-sparse GEMV on an input-major weight over the inputs with
    |x| > threshold, or over ``mask`` [B or 1, K] when given (the threshold is then unused);
    dense without either."""
    if threshold is None and mask is None:
        return F.linear(x, weight, bias)
    if mask is not None:
        threshold = None
    if cpu:
        y = tk.input_sparse_gemv_cpu(x, weight.t(), threshold=threshold, mask=mask,
                                     counts=_counts(counter))
    elif counter is not None:
        y = torch.ops.sparseffn.input_sparse_gemv_counted(x, weight.t(), counter.counts,
                                                          threshold=threshold, mask=mask)
    else:
        y = torch.ops.sparseffn.input_sparse_gemv(x, weight.t(), threshold=threshold,
                                                  mask=mask)
    return y if bias is None else y + bias


def grouped_linear(x: torch.Tensor, weights: list[torch.Tensor],
                   biases: list[torch.Tensor | None], thresholds: list[torch.Tensor],
                   cpu: bool = False, counters: list | None = None) -> list[torch.Tensor]:
    """x [B, K] -> one [B, N_g] per weight: the input-sparse GEMV of every input-major weight
    with its own threshold (and counter), in one launch (outputs are views of one
    [B, sum N_g] tensor)."""
    counters = counters or [None] * len(weights)
    if cpu:
        y = tk.input_sparse_gemv_grouped_cpu(x, [w.t() for w in weights], list(thresholds),
                                             counts=[_counts(c) for c in counters])
    else:
        w_ts = [w.t() for w in weights]
        if all(c is not None for c in counters):
            y = torch.ops.sparseffn.input_sparse_gemv_grouped_counted(
                x, w_ts, list(thresholds), [c.counts for c in counters])
        else:
            for c, t in zip(counters, thresholds):  # some sites tracked, others not
                if c is not None:
                    c.count(above(x.abs(), t))
            y = torch.ops.sparseffn.input_sparse_gemv_grouped(x, w_ts, list(thresholds))
    outs = y.split([w.shape[0] for w in weights], dim=-1)
    return [o if b is None else o + b for o, b in zip(outs, biases)]


def gated_act(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, threshold: torch.Tensor,
              activation: str) -> torch.Tensor:
    """h [B, I] = act(gate) * up on neurons with |act(gate)| > threshold, zeros elsewhere."""
    return torch.ops.sparseffn.sparse_gate_up(x, w_gate, w_up, threshold=threshold,
                                              activation=activation)


def gated_threshold(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                    w_down: torch.Tensor, threshold: torch.Tensor, activation: str,
                    zero: torch.Tensor, cpu: bool = False, counter=None) -> torch.Tensor:
    """The whole MLP [B, H] -> [B, H] under |act(gate)| > threshold; ``counter`` counts the
    neurons that contributed. The gate is read densely, up and down rows of active neurons only
    (down stored input-major)."""
    if cpu:
        return tk.sparse_gated_mlp_cpu(x, w_gate, w_up, w_down.t(), threshold=threshold,
                                       activation=activation, counts=_counts(counter))[0]
    h = gated_act(x, w_gate, w_up, threshold, activation)
    return down_nonzero(h, w_down, zero, counter)


def down_nonzero(h: torch.Tensor, w_down: torch.Tensor, zero: torch.Tensor,
                 counter=None) -> torch.Tensor:
    """h [B, I] @ w_down.T reading only the rows of neurons with h != 0 (``zero`` = 0.0);
    ``counter`` counts those neurons (|h| > 0)."""
    return linear(h, w_down, None, zero, counter=counter)


def gated_masked(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                 w_down: torch.Tensor, mask: torch.Tensor, activation: str,
                 cpu: bool = False) -> torch.Tensor:
    """The whole MLP [B, H] -> [B, H] on the neurons of ``mask`` [B, I] only: gate, up and
    down rows of the others are never read (down stored input-major)."""
    if cpu:
        return tk.sparse_gated_mlp_cpu(x, w_gate, w_up, w_down.t(), mask=mask,
                                       activation=activation)[0]
    return torch.ops.sparseffn.sparse_gated_mlp(x, w_gate, w_up, w_down.t(), mask=mask,
                                                activation=activation)


def up_masked(x: torch.Tensor, w_up: torch.Tensor, mask: torch.Tensor,
              cpu: bool = False) -> torch.Tensor:
    """up(x) [B, I] on the rows of ``mask`` only, exact zeros elsewhere."""
    up = tk.output_sparse_gemv_cpu if cpu else torch.ops.sparseffn.output_sparse_gemv
    return up(x, w_up, mask)


def down_masked(h: torch.Tensor, w_down: torch.Tensor, mask: torch.Tensor,
                cpu: bool = False, counter=None) -> torch.Tensor:
    """h [B, I] @ w_down.T reading only the rows in ``mask`` ([B or 1, I]); ``counter``
    counts the mask's entries over the batch."""
    return linear(h, w_down, None, None, cpu, counter, mask)
