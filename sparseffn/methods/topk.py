"""Top-k: the k largest |act(gate(x))| of each token stay active; exact per token, no text."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparseffn import decode
from sparseffn.methods.base import register_method
from sparseffn.methods.gates import FractionGate, FractionMethod
from sparseffn.modules import ACT_SITE, SparseGatedMLP


class TopKGate(FractionGate):
    """Keeps each token's ``k = I - round(sparsity * I)`` neurons of largest |act(gate(x))|.

    Its "threshold" is the sparsity itself. Decode plan: dense gate, top-k mask,
    ``output_sparse_gemv`` for the up rows, ``input_sparse_gemv`` for the down rows.
    """

    def mask(self, x: torch.Tensor, act: torch.Tensor,
             up: torch.Tensor | None = None) -> torch.Tensor:
        return decode.largest(act.abs(), self.k)

    def has_decode_plan(self, kernel_act: str | None) -> bool:
        return True  # the activation runs in torch; only the up and down reads are kernels

    def decode(self, mlp: SparseGatedMLP, x: torch.Tensor) -> torch.Tensor:
        w_gate, w_up = mlp.gate_up_weights()
        act = mlp.act_fn()(F.linear(x, w_gate))
        mask = self.mask(x, act)
        cpu = mlp._cpu_path
        h = torch.where(mask, act * decode.up_masked(x, w_up, mask, cpu), 0)
        return decode.down_masked(h, mlp.base.down_proj.weight, mask, cpu,
                                  mlp.counter(ACT_SITE))

    def extra_repr(self) -> str:
        return f"sparsity={self.sparsity}, k={self.k}"


@register_method
class TopK(FractionMethod):
    name = "topk"
    criterion = "the k largest \\|act(gate(x))\\| of each token"
    granularity = "exact per token (no calibration text)"
    skips = "rows of up, columns of down"

    def neuron_gate(self, mlp: nn.Module, threshold: torch.Tensor,
                    extras: dict[str, torch.Tensor]) -> TopKGate:
        return TopKGate(float(threshold), mlp.down_proj.weight.shape[1])
