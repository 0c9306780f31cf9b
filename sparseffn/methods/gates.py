"""The runtime gates shared by the neuron criteria, and their bases: a threshold on
|act(gate(x))| per neuron (CATS, CHESS), or a fixed number of neurons kept (top-k, coreinfer)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparseffn import decode
from sparseffn.methods.base import Method, StatSpec
from sparseffn.modules import ACT_SITE, NeuronGate, SparseGatedMLP, above, own_copy, set_buffer


class ActThresholdGate(NeuronGate):
    """Neuron i is active when |act(gate(x))_i| > threshold_i (threshold float32 [] or [I]).

    Decode plan: ``sparse_gate_up`` reads the gate densely and the up rows of active neurons,
    then ``input_sparse_gemv`` reads only the down rows of neurons with h != 0 (down stored
    input-major).
    """

    def __init__(self, threshold: torch.Tensor, device: torch.device) -> None:
        super().__init__()
        self.register_buffer("value", own_copy(threshold, device))

    def mask(self, x: torch.Tensor, act: torch.Tensor,
             up: torch.Tensor | None = None) -> torch.Tensor:
        return above(act.abs(), self.value)

    def threshold(self) -> torch.Tensor:
        return self.value

    def set_threshold(self, value: torch.Tensor) -> None:
        set_buffer(self, "value", value)

    def act_threshold(self) -> torch.Tensor:
        return self.value

    def has_decode_plan(self, kernel_act: str | None) -> bool:
        return kernel_act is not None

    def decode(self, mlp: SparseGatedMLP, x: torch.Tensor) -> torch.Tensor:
        w_gate, w_up = mlp.gate_up_weights()
        if ACT_SITE in mlp.shared_keep:
            # The batch's shared set needs every neuron's margin: the gate densely, then the
            # up and down rows of the set's active neurons only.
            act = mlp.act_fn()(F.linear(x, w_gate))
            mask = mlp.site_mask(ACT_SITE, act.abs())
            cpu = mlp._cpu_path
            h = torch.where(mask, act * decode.up_masked(x, w_up, mask, cpu), 0)
            return decode.down_masked(h, mlp.base.down_proj.weight, mask, cpu,
                                      mlp.counter(ACT_SITE))
        return decode.gated_threshold(x, w_gate, w_up, mlp.base.down_proj.weight, self.value,
                                      mlp.kernel_act, mlp.zero, mlp._cpu_path,
                                      mlp.counter(ACT_SITE))


class ActThresholdMethod(Method):
    """A criterion whose runtime gate is a threshold on |act(gate(x))| (CATS, CHESS): it only
    declares its statistics and how it fits the threshold."""

    act_threshold = True

    def neuron_gate(self, mlp: nn.Module, threshold: torch.Tensor,
                    extras: dict[str, torch.Tensor]) -> ActThresholdGate:
        return ActThresholdGate(threshold, mlp.down_proj.weight.device)


class FractionGate(NeuronGate):
    """A gate that keeps ``k = I - round(sparsity * I)`` neurons, chosen by its subclass; its
    "threshold" is the sparsity itself."""

    def __init__(self, sparsity: float, intermediate: int) -> None:
        super().__init__()
        self.sparsity = float(sparsity)
        self.intermediate = intermediate

    @property
    def k(self) -> int:
        return self.intermediate - round(self.sparsity * self.intermediate)

    def threshold(self) -> torch.Tensor:
        return torch.tensor(self.sparsity)

    def set_threshold(self, value: torch.Tensor) -> None:
        self.sparsity = float(value)


class FractionMethod(Method):
    """A criterion that keeps a fixed fraction of the neurons and needs no calibration text
    (top-k, coreinfer): its "threshold" is the fraction switched off, which the gate turns
    into k for its width."""

    needs_calibration = False

    def stat_specs(self, scope: str) -> tuple[StatSpec, ...]:
        return ()

    def fit(self, stats: dict[str, torch.Tensor], site: str, sparsity: float) -> torch.Tensor:
        return torch.tensor(float(sparsity))
