"""Sparsity regularizers on the FFN activation a = act(gate(x)), one small class each.

Every regularizer follows one interface: ``attach`` checks (and, for some, changes) the model
when a ``SparsityRegularization`` is built, and ``penalty`` turns one forward pass's activations
into a loss term (or None when the method works through the forward itself). The term is
multiplied by the regularizer's schedule at the current step and added to the language-modelling
loss. Activations are ``[..., I]`` tensors, one per decoder layer, with their autograd graph.

- ``ProgressiveL1``: mean |a| (ProSparse), usually under a ``ProgressiveSchedule``.
- ``DensityLoss``: a smooth count of the activations above each layer's zero tolerance, pulled
  down to a target density (in the spirit of DEFT's differentiable density loss).
- ``FixedThreshold``: no loss term; the model is patched with calibrated thresholds (CATS),
  which stay active during training, so it learns to work with the sparse forward.
- ``ReluSubstitution``: no loss term; ReLU or FATReLU (shifted ReLU) replaces SiLU/GELU in the
  gate and fine-tuning recovers the quality (ReLUfication). Combine with ``ProgressiveL1`` for
  the full ProSparse recipe.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Sequence

import torch

from sparseffn.finetune.errors import FinetuneError
from sparseffn.methods import DEFAULT_METHOD
from sparseffn.finetune.schedule import ConstantSchedule, Schedule

if TYPE_CHECKING:
    from sparseffn.finetune.regularization import SparsityRegularization


class Regularizer(ABC):
    """Interface of a sparsity regularizer.

    Attributes:
        name: short name used in logs (``reg/<name>``).
        adds_term: whether ``penalty`` returns a loss term (else the method acts through the
            forward pass itself).
        schedule: factor of the penalty at each optimizer step.
    """

    name: str = "regularizer"
    adds_term: bool = True

    def __init__(self, schedule: Schedule | None = None) -> None:
        if schedule is not None and not isinstance(schedule, Schedule):
            raise FinetuneError(
                f"{type(self).__name__}: schedule must be a sparseffn.finetune Schedule "
                f"(ConstantSchedule, LinearSchedule, ProgressiveSchedule), got {schedule!r}"
            )
        self.schedule = schedule if schedule is not None else ConstantSchedule(1.0)

    def attach(self, reg: "SparsityRegularization") -> None:
        """Check the model (and change it if the method needs to) before training."""

    @abstractmethod
    def penalty(self, acts: Sequence[torch.Tensor], reg: "SparsityRegularization",
                ) -> torch.Tensor | None:
        """Unweighted loss term (0-dim) from one forward pass, or None for none.

        Args:
            acts: per layer, the activation a [..., I] of this forward pass.
            reg: the attached regularization (per-layer tolerance and scale).
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}(schedule={self.schedule!r})"


class ProgressiveL1(Regularizer):
    """L1 on the activations: the mean over layers of mean |a| (ProSparse).

    With a ``ProgressiveSchedule`` the factor starts at 0 and rises along sine curves, so the
    model is not shocked by a strong penalty before it has adapted.
    """

    name = "l1"

    def penalty(self, acts: Sequence[torch.Tensor], reg: "SparsityRegularization",
                ) -> torch.Tensor:
        return torch.stack([a.float().abs().mean() for a in acts]).mean()


class DensityLoss(Regularizer):
    """Pull each layer's activation density down to ``target``.

    The density of layer l is the fraction of activations with |a| above its zero tolerance
    t_l. Counting is not differentiable, so the loss counts smoothly:
    ``d_l = mean(sigmoid((|a| - t_l) / (temperature * s_l)))`` with s_l the layer's scale (its
    tolerance, or its mean |a| when the tolerance is 0). The term is the mean over layers of
    ``relu(d_l - target)``: layers already at or below the target are left alone, and only
    activations near the tolerance get a gradient, unlike L1, which shrinks large ones too.

    Args:
        target: density to reach, in (0, 1) (0.3 means 70% of activations at or below t_l).
        temperature: width of the smooth step relative to the layer's scale.
    """

    name = "density"

    def __init__(self, target: float, schedule: Schedule | None = None,
                 temperature: float = 0.25) -> None:
        super().__init__(schedule)
        if not (isinstance(target, (int, float)) and 0.0 < target < 1.0):
            raise FinetuneError(
                f"DensityLoss target density must lie in (0, 1), got {target!r}: it is the "
                "fraction of activations to keep above the tolerance (0.3 for 70% sparsity)"
            )
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
                and temperature > 0):
            raise FinetuneError(f"DensityLoss temperature must be > 0, got {temperature!r}")
        self.target = float(target)
        self.temperature = float(temperature)

    def soft_density(self, act: torch.Tensor, tolerance: torch.Tensor,
                     scale: torch.Tensor) -> torch.Tensor:
        """Smooth density (0-dim) of one layer's activation [..., I]."""
        width = self.temperature * scale
        return torch.sigmoid((act.float().abs() - tolerance) / width).mean()

    def penalty(self, acts: Sequence[torch.Tensor], reg: "SparsityRegularization",
                ) -> torch.Tensor:
        terms = []
        for i, a in enumerate(acts):
            density = self.soft_density(a, reg.tolerance(i), reg.scale(i))
            terms.append(torch.relu(density - self.target))
        return torch.stack(terms).mean()

    def __repr__(self) -> str:
        return (f"DensityLoss(target={self.target}, temperature={self.temperature}, "
                f"schedule={self.schedule!r})")


class FixedThreshold(Regularizer):
    """CATS-style fine-tuning: train the patched model with its thresholds active.

    The model must be patched with a neuron criterion first
    (``sparseffn.sparsify(model, method="cats", sparsity=0.7, calibration=...)``; CHESS's
    per-neuron thresholds or top-k work too); the masks
    ``torch.where(|a| > t, a * up, 0)`` pass gradients to the active neurons, so the model
    learns to do without the inactive ones. Adds no loss term.
    """

    name = "fixed_threshold"
    adds_term = False

    def attach(self, reg: "SparsityRegularization") -> None:
        for i, mlp in enumerate(reg.patched_mlps()):
            if mlp is None or mlp.neuron_gate is None:
                raise FinetuneError(
                    "FixedThreshold trains with the calibrated thresholds active, but layer "
                    f"{i} has no neuron threshold: patch the model first with "
                    f"sparseffn.sparsify(model, method={DEFAULT_METHOD!r}, sparsity=..., "
                    "calibration=..., tokenizer=...) or another method that gates neurons"
                )

    def penalty(self, acts: Sequence[torch.Tensor], reg: "SparsityRegularization") -> None:
        return None


class ReluSubstitution(Regularizer):
    """ReLUfication: ReLU (``shift=0``) or FATReLU (``shift>0``) in place of SiLU/GELU.

    Values at or below ``shift`` become exact zeros; fine-tuning recovers the quality. The
    substitution is kept when the regularization is removed (``keep_activation=True``), and
    the model's config then says ``relu``. Adds no loss term.
    """

    name = "relu"
    adds_term = False

    def __init__(self, shift: float = 0.0) -> None:
        super().__init__(None)
        if not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift >= 0):
            raise FinetuneError(f"the ReLU shift must be a finite number >= 0, got {shift!r}")
        self.shift = float(shift)

    def attach(self, reg: "SparsityRegularization") -> None:
        for probe in reg.probes:
            probe.shift = self.shift

    def penalty(self, acts: Sequence[torch.Tensor], reg: "SparsityRegularization") -> None:
        return None

    def __repr__(self) -> str:
        return f"ReluSubstitution(shift={self.shift})"

