"""The kernel path of the sparse modules: decode steps through ``triton_kernels``.

A decode step feeds each layer one new token per sequence (x [B, 1, H]); its time is the time of
reading the weights, so the sparse modules hand it to the Triton ops, which never load the
weights of inactive neurons. Everything else (prefill, training, the CPU) takes the reference
path in ``sparseffn.modules``. Both paths apply the same thresholds with the same strict ``>``
test in fp32, so they compute the same function up to rounding (the kernels accumulate in fp32;
a neuron within rounding of its threshold may be decided either way).

Plans (decided once, at patch time, from the gated sites and the modules found):
    "act"   CATS/CHESS: |act(gate)| > t per neuron. ``sparse_gate_up`` reads the gate densely
            and the up rows of active neurons, then ``input_sparse_gemv`` reads only the down
            rows of neurons with h != 0 (down stored input-major).
    "topk"  per-token top-k of |act(gate)|: dense gate, top-k mask, ``output_sparse_gemv`` for
            the up rows, ``input_sparse_gemv`` for the down rows.
    "predict" a trained predictor's top-k neurons: ``sparse_gated_mlp`` with the mask, which
            reads the gate, up and down rows of active neurons only.
    "input" TEAL/WINA on the MLP: ``input_sparse_gemv`` for every gated projection (gated
            projections stored input-major), dense ``F.linear`` for ungated ones; gate and up,
            which read the same x, in one grouped launch.
Attention projections (``SparseLinear``) use ``input_sparse_gemv``; q, k and v, which read the
same x, are computed in one grouped launch by the first of them that sees it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Kernel-path policies: "auto" takes the kernels on CUDA tensors; "always" also on the CPU
#: when Triton runs in interpreter mode (tests); "never" keeps the reference path everywhere.
KERNEL_MODES = ("auto", "always", "never")

#: Largest number of sequences a decode step sends to the kernels under "always".
MAX_DECODE_BATCH = 16
#: ... and under "auto". At batch 4 the union of the sequences' active rows is most rows, and
#: the sparse path measured slower than dense (Llama-3-8B shape, H100: TEAL 0.71x, CHESS 0.92x
#: at 50%; docs/e2e.md), so "auto" decodes larger batches densely.
AUTO_MAX_BATCH = 1


def kernel_activation(act_fn: nn.Module) -> str | None:
    """The kernels' name for ``act_fn`` ("silu" or "gelu_tanh"), or None if it is neither.

    Decided by evaluating the module, not by its class name: families wrap the same function
    in different classes (SiLU, SiLUActivation, GELUTanh, PytorchGELUTanh ...).
    """
    probe = torch.linspace(-8.0, 8.0, 257)
    try:
        with torch.no_grad():
            out = act_fn(probe)
    except Exception:  # noqa: BLE001 - any module that cannot run on a CPU probe is unknown
        return None
    if not isinstance(out, torch.Tensor) or out.shape != probe.shape:
        return None
    for name, ref in (("silu", F.silu(probe)), ("gelu_tanh", F.gelu(probe, approximate="tanh"))):
        if torch.allclose(out.float(), ref, rtol=1e-5, atol=1e-6):
            return name
    return None


def is_plain_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` whose forward is the plain affine map on its own float weight.

    Adapter wrappers (peft's LoRA layers) and quantized linears are excluded: the kernels read
    ``weight`` directly, so a module that adds anything to it must keep its own forward.
    """
    return (type(module) is nn.Linear
            and module.weight.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and not module._forward_hooks and not module._forward_pre_hooks)


def is_decode_step(x: torch.Tensor, max_batch: int) -> bool:
    """x [B, 1, H] with at most ``max_batch`` sequences."""
    return x.dim() == 3 and x.shape[1] == 1 and x.shape[0] <= max_batch


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
