"""Top-k: the k largest |act(gate(x))| of each token stay active; exact per token, no text."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparseffn import decode
from sparseffn.methods.base import Method, StatSpec, register_method
from sparseffn.modules import ACT_SITE, NeuronGate, SparseGatedMLP


class TopKGate(NeuronGate):
    """Keeps each token's ``k = I - round(sparsity * I)`` neurons of largest |act(gate(x))|.

    Its "threshold" is the sparsity itself. Decode plan: dense gate, top-k mask,
    ``output_sparse_gemv`` for the up rows, ``input_sparse_gemv`` for the down rows.
    """

    def __init__(self, sparsity: float, intermediate: int) -> None:
        super().__init__()
        self.sparsity = float(sparsity)
        self.intermediate = intermediate

    @property
    def k(self) -> int:
        return self.intermediate - round(self.sparsity * self.intermediate)

    def mask(self, x: torch.Tensor, act: torch.Tensor,
             up: torch.Tensor | None = None) -> torch.Tensor:
        magnitude = act.abs()
        keep = magnitude.topk(self.k, dim=-1).indices
        return torch.zeros_like(magnitude, dtype=torch.bool).scatter_(-1, keep, True)

    def threshold(self) -> torch.Tensor:
        return torch.tensor(self.sparsity)

    def set_threshold(self, value: torch.Tensor) -> None:
        self.sparsity = float(value)

    def has_decode_plan(self, kernel_act: str | None) -> bool:
        return True  # the activation runs in torch; only the up and down reads are kernels

    def decode(self, mlp: SparseGatedMLP, x: torch.Tensor) -> torch.Tensor:
        w_gate, w_up = mlp.gate_up_weights()
        act = mlp.act_fn()(F.linear(x, w_gate))
        mask = self.mask(x, act)
        mlp.count(ACT_SITE, mask)
        cpu = mlp._cpu_path
        h = torch.where(mask, act * decode.up_masked(x, w_up, mask, cpu), 0)
        return decode.down_masked(h, mlp.base.down_proj.weight, mask, cpu)

    def extra_repr(self) -> str:
        return f"sparsity={self.sparsity}, k={self.k}"


@register_method
class TopK(Method):
    name = "topk"
    criterion = "the k largest \\|act(gate(x))\\| of each token"
    granularity = "exact per token (no calibration text)"
    skips = "rows of up, columns of down"
    needs_calibration = False

    def stat_specs(self, scope: str) -> tuple[StatSpec, ...]:
        return ()

    def fit(self, stats: dict[str, torch.Tensor], site: str, sparsity: float) -> torch.Tensor:
        # The "threshold" of top-k is the fraction of neurons switched off; the gate turns it
        # into k for its width.
        return torch.tensor(float(sparsity))

    def neuron_gate(self, mlp: nn.Module, threshold: torch.Tensor,
                    extras: dict[str, torch.Tensor]) -> TopKGate:
        return TopKGate(float(threshold), mlp.down_proj.weight.shape[1])
