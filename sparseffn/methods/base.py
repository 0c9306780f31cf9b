"""The method interface and its registry.

A method (criterion) is one class, registered with ``@register_method``, that declares:
- the *sites* it gates in each decoder layer: projection names (``q_proj`` ... ``down_proj``,
  fused ``qkv_proj``/``gate_up_proj``), whose input magnitude is gated, or ``act``, the FFN
  neurons, which it gates through a runtime ``NeuronGate``;
- the calibration statistics it needs (``StatSpec``s over the signals of
  ``sparseffn.families.signal_of``: ``attn_in``, ``o_in``, ``mlp_in``, ``act``, ``up``,
  ``down_in``);
- how it fits a site's threshold at a sparsity level from one layer's statistics (``fit``);
- for ``act``, its runtime gate (``neuron_gate``), which carries the reference mask and the
  decode plan through the kernels;
- optionally, parts it trains on calibration text (``train``) and checks on a loaded artifact
  (``check``).

Everything else (config validation, the CLI's choices, artifact checks, the README's method
table) reads the registry, so a new criterion is one new module and no other file changes.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from calibrate.observe import StatSpec
from sparseffn.errors import CalibrationError, SparseFFNError
from sparseffn.families import FamilySpec
from sparseffn.modules import ACT_SITE, NeuronGate

__all__ = ["ACT_SITE", "FitContext", "InputMethod", "Method", "NeuronGate", "StatSpec", "get_method",
           "method_class", "method_names", "methods_table", "register_method"]


@dataclass
class FitContext:
    """What a method's ``train`` hook gets: the model patched at zero thresholds (it computes
    the dense function) and the calibration data.

    Attributes:
        model: the patched model.
        mlps: per decoder layer, (layer index, its ``SparseGatedMLP``, its down weight [H, I]).
        windows: calibration token ids [N, L].
        sparsities: the allocated level per site key ``layers.{i}.{site}``.
        config: the ``SparsityConfig`` being fitted.
        batch_size, progress: as given to ``sparsify``.
    """

    model: nn.Module
    mlps: list[tuple[int, nn.Module, torch.Tensor]]
    windows: torch.Tensor
    sparsities: dict[str, float]
    config: Any
    batch_size: int
    progress: bool


class Method(ABC):
    """Interface of a sparsity criterion, bound to one model family.

    Class attributes (the registry and the docs read them):
        name: the name users pass as ``method=`` (no ``:``, which separates CLI options).
        criterion, granularity, skips: one line each for the README's method table.
        needs_calibration: False for criteria that need no text (top-k).
        gates_inputs: its sites are projection inputs, so it can cover attention projections
            (``scope="all"``) and share a layer's sparsity among them (``allocation="greedy"``).
        act_threshold: it gates neurons by a threshold on |act(gate(x))| (the thresholds that
            fixed-threshold fine-tuning trains with).
        trained: it trains parts of its own on the calibration text (``train``), which makes
            it slow to calibrate (left out of default sweeps).
        decides_at_prompt: it computes a prompt densely and fixes each sequence's active set
            from it for the decode steps (CoreInfer), so only decode-step perplexity
            (``perplexity(..., prompt_len=P)``) measures it.
    """

    name: ClassVar[str]
    criterion: ClassVar[str] = ""
    granularity: ClassVar[str] = ""
    skips: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = True
    gates_inputs: ClassVar[bool] = False
    act_threshold: ClassVar[bool] = False
    trained: ClassVar[bool] = False
    decides_at_prompt: ClassVar[bool] = False

    def __init__(self, spec: FamilySpec) -> None:
        self.spec = spec

    def sites(self, scope: str) -> tuple[str, ...]:
        """Gated sites of one decoder layer for ``scope`` in {"mlp", "all"}."""
        return (ACT_SITE,)

    @abstractmethod
    def stat_specs(self, scope: str) -> tuple[StatSpec, ...]:
        """Statistics to collect per layer."""

    @abstractmethod
    def fit(self, stats: dict[str, torch.Tensor], site: str, sparsity: float) -> torch.Tensor:
        """Threshold for ``site`` at ``sparsity`` from one layer's ``stats``.

        Returns:
            float32 tensor, [] (one threshold) or [C] (per input channel / neuron).
        """

    def neuron_gate(self, mlp: nn.Module, threshold: torch.Tensor,
                    extras: dict[str, torch.Tensor]) -> NeuronGate:
        """The runtime gate of the ``act`` site for the original MLP ``mlp``, from the site's
        fitted threshold and the layer's extra tensors (``Calibration.extras``)."""
        raise NotImplementedError(f"method {self.name!r} gates no neurons")

    def calibration_gate(self, mlp: nn.Module, threshold: torch.Tensor) -> NeuronGate:
        """The gate of the ``act`` site during calibration passes, first at zero threshold
        (dense) and then at fitted ones; by default the runtime gate itself."""
        return self.neuron_gate(mlp, threshold, {})

    def train(self, ctx: FitContext) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor],
                                              dict[str, float]] | None:
        """Train the method's own parts on calibration text: (statistics, extra tensors per
        layer, metrics for the artifact's meta), or None to be fitted from observed statistics
        (the default)."""
        return None

    @classmethod
    def check(cls, thresholds: dict[str, torch.Tensor], extras: dict[str, torch.Tensor],
              where: str) -> None:
        """Raise CalibrationError if a loaded artifact (at ``where``) lacks what this method
        needs; the default needs nothing beyond thresholds."""


_REGISTRY: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available as ``method=cls.name`` everywhere."""
    name = getattr(cls, "name", None)
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"register_method takes a Method subclass, got {cls!r}")
    if not isinstance(name, str) or not name or ":" in name or name != name.strip():
        raise ValueError(f"{cls.__name__}.name must be a non-empty string without ':' or "
                         f"spaces around it, got {name!r}")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"a method named {name!r} is already registered "
                         f"({_REGISTRY[name].__module__}.{_REGISTRY[name].__name__})")
    _REGISTRY[name] = cls
    return cls


def method_names() -> tuple[str, ...]:
    """Registered method names, in registration order."""
    return tuple(_REGISTRY)


def method_class(name: str) -> type[Method]:
    """The registered class called ``name``, or a SparseFFNError listing the choices."""
    if name not in _REGISTRY:
        raise SparseFFNError(f"unknown method {name!r}; choose one of {method_names()} (or "
                             "register your own with sparseffn.methods.register_method)")
    return _REGISTRY[name]


def get_method(name: str, spec: FamilySpec) -> Method:
    """The method called ``name``, bound to the model family ``spec``."""
    return method_class(name)(spec)


def methods_table() -> str:
    """The registered methods as a markdown table (the README's, checked by a test)."""
    lines = ["| method | criterion | granularity | weights skipped at decode |",
             "| --- | --- | --- | --- |"]
    lines += [f"| `{c.name}` | {c.criterion} | {c.granularity} | {c.skips} |"
              for c in _REGISTRY.values()]
    return "\n".join(lines)


def require_extras(extras: dict[str, torch.Tensor], thresholds: dict[str, torch.Tensor],
                   names: tuple[str, ...], where: str) -> None:
    """Every layer with thresholds has each extra tensor ``names`` (for ``Method.check``)."""
    layers = {k.split(".")[1] for k in thresholds}
    missing = sorted(f"layers.{i}.{n}" for i in layers for n in names
                     if f"layers.{i}.{n}" not in extras)
    if missing:
        raise CalibrationError(f"{where} is inconsistent: {missing[:3]} (and {len(missing)} in "
                               "all) are missing; recalibrate")


class InputMethod(Method):
    """A criterion on each projection's input channels: the MLP's projections, and with
    ``scope="all"`` the attention's too."""

    gates_inputs = True

    def sites(self, scope: str) -> tuple[str, ...]:
        spec = self.spec
        mlp = (*spec.mlp_in, "down_proj")
        return (*spec.attn_in, spec.attn_out, *mlp) if scope == "all" else mlp
