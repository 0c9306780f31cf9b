"""Probes on the FFN activation: see act(gate(x)) with gradients, optionally substitute it.

A probe replaces the MLP's activation module (``FamilySpec.act_attr``, e.g. ``mlp.act_fn``) on
the *original* MLP, so it sits inside both the plain model and a patched ``SparseGatedMLP``
(which calls ``base.act_fn``): the regularizers see the activation before any sparsity mask,
with its autograd graph, without changes to the MLP code. A probe can also compute a shifted
ReLU (FATReLU; shift 0 is plain ReLU) in place of SiLU/GELU, which is how ReLUfication trains.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from sparseffn.errors import UnsupportedModelError
from sparseffn.families import FamilySpec, decoder_layers, family_of, layer_mlp
from sparseffn.finetune.errors import FinetuneError
from sparseffn.modules import SparseGatedMLP


class ActivationSink(Protocol):
    def observe(self, layer: int, act: torch.Tensor) -> None:
        """Receive layer ``layer``'s activation output [..., I]."""


def fat_relu(x: torch.Tensor, shift: float) -> torch.Tensor:
    """x where x > shift, else 0 (ReLU for shift 0); the gradient is 1 where x > shift."""
    return torch.where(x > shift, x, torch.zeros((), dtype=x.dtype, device=x.device))


class ShiftedReLU(nn.Module):
    """FATReLU as a module: what a probe with a substitution leaves behind after training."""

    def __init__(self, shift: float = 0.0) -> None:
        super().__init__()
        self.shift = float(shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., I] -> [..., I]."""
        return fat_relu(x, self.shift)

    def extra_repr(self) -> str:
        return f"shift={self.shift}"


class ActivationProbe(nn.Module):
    """Stands in for an MLP's activation module and reports its output to a sink.

    Attributes:
        inner: the original activation module (put back by ``remove_probes``).
        layer: decoder layer index.
        shift: None to compute ``inner``; a float to compute FATReLU with that shift instead.
    """

    def __init__(self, inner: nn.Module, layer: int, sink: ActivationSink) -> None:
        super().__init__()
        self.inner = inner
        self.layer = layer
        self.shift: float | None = None
        self._sink = sink  # a plain attribute: the sink is not a submodule

    def forward(self, gate: torch.Tensor) -> torch.Tensor:
        """gate [..., I] (pre-activation) -> act [..., I]."""
        act = self.inner(gate) if self.shift is None else fat_relu(gate, self.shift)
        self._sink.observe(self.layer, act)
        return act

    def extra_repr(self) -> str:
        return f"layer={self.layer}, shift={self.shift}"


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft ``PeftModel`` and/or a DDP wrapper."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif callable(getattr(model, "get_base_model", None)):  # peft.PeftModel
            model = model.get_base_model()
        else:
            return model


def original_mlps(model: nn.Module) -> list[nn.Module]:
    """Each decoder layer's original MLP (the ``base`` of a patched one)."""
    out = []
    for layer in decoder_layers(model):
        mlp = layer_mlp(layer)
        out.append(mlp.base if isinstance(mlp, SparseGatedMLP) else mlp)
    return out


def gated_spec(model: nn.Module, who: str) -> FamilySpec:
    """The family of ``model``, or a clear error when it has no gated FFN to regularize."""
    try:
        spec = family_of(model)
    except UnsupportedModelError as exc:  # say what the regularizer needs
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise FinetuneError(
            f"{who} acts on a gated FFN's activation, down(act(gate(x)) * up(x)); "
            f"model_type {model_type!r} has none sparseffn knows ({exc}). Use a model of a "
            "supported family (sparseffn.SUPPORTED_MODEL_TYPES)."
        ) from exc
    for i, mlp in enumerate(original_mlps(model)):
        if not isinstance(getattr(mlp, spec.act_attr, None), nn.Module):
            raise FinetuneError(
                f"{who}: layer {i}'s MLP ({type(mlp).__name__}) has no activation module "
                f"`{spec.act_attr}`, so there is no gated activation to regularize"
            )
    return spec


def install_probes(model: nn.Module, sink: ActivationSink, who: str) -> list[ActivationProbe]:
    """Put a probe in every layer's MLP (``model`` unwrapped); returns them by layer."""
    spec = gated_spec(model, who)
    mlps = original_mlps(model)
    if any(isinstance(getattr(m, spec.act_attr), ActivationProbe) for m in mlps):
        raise FinetuneError(
            "the model already carries sparsity-regularization probes; call .remove() on the "
            "SparsityRegularization attached before attaching another"
        )
    probes = [ActivationProbe(getattr(m, spec.act_attr), i, sink) for i, m in enumerate(mlps)]
    for mlp, probe in zip(mlps, probes):
        setattr(mlp, spec.act_attr, probe)
    return probes


def remove_probes(model: nn.Module, keep_substitution: bool = True) -> None:
    """Put the activations back; a substituted one stays as ``ShiftedReLU`` if asked.

    With a kept substitution the model's config says ``relu`` (``hidden_act`` or
    ``hidden_activation``), so a saved model loads with ReLU; a FATReLU shift is recorded as
    ``config.sparseffn_relu_shift`` (transformers ignores it: calibrate with a threshold at
    least that large to reproduce it, see ``sparseffn.finetune.recipe``).
    """
    spec = family_of(model)
    shifts = set()
    for mlp in original_mlps(model):
        probe = getattr(mlp, spec.act_attr)
        if not isinstance(probe, ActivationProbe):
            continue
        if keep_substitution and probe.shift is not None:
            setattr(mlp, spec.act_attr, ShiftedReLU(probe.shift))
            shifts.add(probe.shift)
        else:
            setattr(mlp, spec.act_attr, probe.inner)
    if shifts:
        config = model.config
        for key in ("hidden_act", "hidden_activation"):
            if getattr(config, key, None) is not None:
                setattr(config, key, "relu")
        config.sparseffn_relu_shift = max(shifts)
